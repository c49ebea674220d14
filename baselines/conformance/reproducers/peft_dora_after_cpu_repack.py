"""PEFT 0.21.x + bitsandbytes 0.50.x on a CPU with AVX512-BF16: a DoRA layer over a 4-bit base gives wrong outputs once
bitsandbytes has repacked the base for its CPU kernel.

bitsandbytes repacks a Linear4bit on the first eval-mode forward whose input needs no grad (nn/modules.py
Linear4bit.forward -> functional._convert_weight_packed_for_cpu: new byte order, absmax transposed and cast to
bfloat16, quant_state.packing_format_for_cpu = True). DoRA's forward reads the base weight for its norm through
peft/utils/integrations.py dequantize_module_weight -> dequantize_bnb_weight ->
`bnb.functional.dequantize_4bit(weight.data, weight.quant_state)`, which does not know that layout: the norm, and so
the magnitude factor m / ||W0 + s B A||, come from a scrambled weight. The base output itself is right (bitsandbytes
computes it with the packed kernel); plain LoRA never reads the weight in its forward and is unaffected.

Run: python baselines/conformance/reproducers/peft_dora_after_cpu_repack.py
Exit 1: reproduced; 0: the repacked layer gives DoRA's output; 2: this CPU has no AVX512-BF16 (no packed layout).
Uses peft, bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import peft
import torch
from peft import LoraConfig, get_peft_model

if not bnb.functional.has_avx512bf16():
    print("not reproducible here: bitsandbytes reports no AVX512-BF16 on this CPU (the packed layout is off)")
    sys.exit(2)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        self.proj.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4",
                                             module=self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


torch.manual_seed(0)
tiny = Tiny().to("cpu")
tiny.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT then puts its bnb LoRA layer on it
model = get_peft_model(tiny, LoraConfig(target_modules=["proj"], r=4, lora_alpha=8, init_lora_weights=False,
                                        use_dora=True))
layer = model.base_model.model.proj
base = layer.base_layer
with torch.no_grad():  # a trained magnitude (a fresh one equals the norm, and the factor m/n is 1)
    layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 64))
# DoRA in float64 from the weight in the standard layout, read before any repack
w0 = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
s = layer.scaling["default"]
m = layer.lora_magnitude_vector["default"].weight.detach().double()
v = w0 + s * (b @ a)
f = m / torch.linalg.vector_norm(v, dim=1)
x = torch.randn(3, 64)
want = (x.double() @ v.t()) * f + base.bias.detach().double()
model.eval()
with torch.no_grad():
    y = model(x).double()  # the first eval-mode no-grad forward: bitsandbytes repacks the base first
repacked = bool(getattr(base.weight.quant_state, "packing_format_for_cpu", False))
# bound: every product and sum in float32 (64 terms) plus the packed kernel's bfloat16 rounding of x and W
mag = (x.double().abs() @ v.abs().t()) * f.abs() + base.bias.detach().double().abs()
bound = float(((2**-8 + 2**-8 + 70 * 2**-24) * 2 * mag).max())
err = float((y - want).abs().max())
print(f"peft {peft.__version__}, bitsandbytes {bnb.__version__}, torch {torch.__version__}: repacked={repacked}; "
      f"max |y - DoRA(x)| = {err:.3g} (rounding bound {bound:.3g}); max |y| = {float(y.abs().max()):.3g}")
if err > bound:
    print("reproduced: after the repack DoRA's norm is taken on the packed weight read as if it were in the standard "
          "layout")
    sys.exit(1)
print("not reproduced: the repacked DoRA layer gives DoRA's output")
