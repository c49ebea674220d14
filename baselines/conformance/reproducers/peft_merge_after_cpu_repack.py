"""PEFT 0.21.x + bitsandbytes 0.50.x on a CPU with AVX512-BF16: merging a LoRA adapter into a 4-bit base after
an eval-mode forward writes garbage into the base weight.

bitsandbytes repacks a Linear4bit for its CPU kernel on the first eval-mode forward whose input needs no grad
(nn/modules.py Linear4bit.forward -> functional._convert_weight_packed_for_cpu: new byte order, absmax transposed
and cast to bfloat16, quant_state.packing_format_for_cpu = True). PEFT's merge reads the base with
`bnb.functional.dequantize_4bit(weight.data, weight.quant_state)` (peft/utils/integrations.py
dequantize_bnb_weight), which does not know that layout, and requantizes what it read.

PEFT's OFT merge reads the same way and requantizes with `quant_state.dtype`, which the repack set to bfloat16: the
base loses its storage dtype (`--method oft` checks that too).

Run: python baselines/conformance/reproducers/peft_merge_after_cpu_repack.py [--method lora|oft]
Exit 1: reproduced; 0: the merged weight is right; 2: this CPU has no AVX512-BF16 (the layout does not exist).
Uses peft, bitsandbytes and torch only."""

import copy
import sys

import bitsandbytes as bnb
import peft
import torch
from peft import LoraConfig, OFTConfig, get_peft_model

METHOD = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else "lora"
if METHOD not in ("lora", "oft"):
    print(f"unknown --method {METHOD!r}: use lora or oft")
    sys.exit(2)

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
config = (LoraConfig(target_modules=["proj"], r=4, lora_alpha=8, init_lora_weights=False) if METHOD == "lora" else
          OFTConfig(target_modules=["proj"], r=4, oft_block_size=0, init_weights=False))
model = get_peft_model(tiny, config)
layer = model.base_model.model.proj
assert type(layer).__module__.startswith("peft.tuners."), type(layer)
x = torch.randn(3, 64)
w_before = weight(layer.base_layer)
dtype_before = layer.base_layer.weight.quant_state.dtype
model.eval()
with torch.no_grad():
    y_unmerged = model(x).float()  # the first eval-mode forward: bitsandbytes repacks the base for its CPU kernel
print("repacked:", bool(getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)))
delta = layer.get_delta_weight("default").float() if METHOD == "lora" else None
layer.merge()
with torch.no_grad():
    y_merged = model(x).float()
dtype_after = layer.base_layer.weight.quant_state.dtype
err = (y_merged - y_unmerged).abs().max().item()
# one requantization moves an element by at most half the largest gap between adjacent codes times its block's
# absmax; over a row of 64 inputs that moves an output by at most that times sum |x| (bfloat16 compute on top)
code = torch.sort(layer.base_layer.weight.quant_state.code.float().unique()).values
gap = float((code[1:] - code[:-1]).max()) / 2
bound = (gap * weight(layer.base_layer).abs().max().item() * x.abs().sum(-1).max().item()
         + 2**-7 * y_unmerged.abs().max().item())
print(f"peft {peft.__version__} {METHOD}, bitsandbytes {bnb.__version__}, torch {torch.__version__}: "
      f"max |y_merged - y_unmerged| = {err:.3g} (bound of one requantization {bound:.3g}); "
      f"quant_state.dtype {dtype_before} -> {dtype_after}")
bad = []
if delta is not None:  # LoRA: the merged weight itself, against W + delta within one requantization
    w_err = (weight(layer.base_layer) - (w_before + delta)).abs().max().item()
    w_bound = gap * (w_before + delta).abs().max().item() * (1 + 2**-8)
    print(f"max |W_merged - (W + delta)| = {w_err:.3g} (bound of one requantization {w_bound:.3g})")
    if w_err > w_bound:
        bad.append("the merged weight is not W + delta: the merge read the repacked weight as if it were in the "
                   "standard layout")
if err > bound:
    bad.append("the merged output is not the unmerged one: the merge read the repacked weight as if it were in the "
               "standard layout")
if dtype_after != dtype_before:
    bad.append(f"the merge requantized with the repack's bfloat16 instead of the base's {dtype_before}")
if bad:
    print("reproduced: " + "; ".join(bad))
    sys.exit(1)
print("not reproduced: the merged layer gives the unmerged output within one requantization and keeps its dtype")
