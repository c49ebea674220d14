"""PEFT 0.21.x + bitsandbytes 0.50.x on a CPU with AVX512-BF16: merging a LoRA adapter into a 4-bit base after
an eval-mode forward writes garbage into the base weight.

bitsandbytes repacks a Linear4bit for its CPU kernel on the first eval-mode forward whose input needs no grad
(nn/modules.py Linear4bit.forward -> functional._convert_weight_packed_for_cpu: new byte order, absmax transposed
and cast to bfloat16, quant_state.packing_format_for_cpu = True). PEFT's merge reads the base with
`bnb.functional.dequantize_4bit(weight.data, weight.quant_state)` (peft/utils/integrations.py
dequantize_bnb_weight), which does not know that layout, and requantizes what it read.

Run: python baselines/conformance/reproducers/peft_merge_after_cpu_repack.py
Exit 1: reproduced; 0: the merged weight is right; 2: this CPU has no AVX512-BF16 (the layout does not exist).
Uses peft, bitsandbytes and torch only."""

import copy
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


def weight(layer: torch.nn.Module) -> torch.Tensor:
    """The 4-bit weight in the standard layout (a copy turned back with bitsandbytes' own inverse)."""
    w = layer.weight
    data, state = w.data, w.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
    return bnb.functional.dequantize_4bit(data, state).float()


torch.manual_seed(0)
tiny = Tiny().to("cpu")
tiny.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT then puts its bnb LoRA layer on it
model = get_peft_model(tiny, LoraConfig(target_modules=["proj"], r=4, lora_alpha=8,
                                                    init_lora_weights=False))
lora = model.base_model.model.proj
assert type(lora).__module__ == "peft.tuners.lora.bnb", type(lora)
x = torch.randn(3, 64)
w_before = weight(lora.base_layer)
model.eval()
with torch.no_grad():
    model(x)  # the first eval-mode forward: bitsandbytes repacks the base for its CPU kernel
print("repacked:", bool(getattr(lora.base_layer.weight.quant_state, "packing_format_for_cpu", False)))
delta = lora.get_delta_weight("default").float()
lora.merge()
w_merged = weight(lora.base_layer)
err = (w_merged - (w_before + delta)).abs().max().item()
print(f"peft {peft.__version__}, bitsandbytes {bnb.__version__}, torch {torch.__version__}: "
      f"max |W_merged - (W + delta)| = {err:.3g} (|delta| max {delta.abs().max().item():.3g}, "
      f"|W| max {w_before.abs().max().item():.3g})")
# one requantization moves an element by at most half the largest gap between adjacent codes times its block's
# absmax (bounded by the largest |W + delta|); bfloat16 absmax rounding (2**-8) on top
code = torch.sort(lora.base_layer.weight.quant_state.code.float().unique()).values
bound = float((code[1:] - code[:-1]).max()) / 2 * (w_before + delta).abs().max().item() * (1 + 2**-8)
print(f"bound of one requantization: {bound:.3g}")
if err > bound:
    print("reproduced: the merge read the repacked weight as if it were in the standard layout")
    sys.exit(1)
print("not reproduced: the merged weight is W + delta within one requantization")
