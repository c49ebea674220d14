"""bitsandbytes 0.50.x, CPU with AVX512-BF16: after an eval-mode no-grad forward has repacked a Linear4bit
for the CPU, a train-mode forward whose input requires grad raises RuntimeError ("a view of a leaf Variable
that requires grad is being used in an in-place operation"). The bias does not require grad here, as in a
QLoRA base whose parameters are frozen.

Run: python xfails/bitsandbytes/cpu_packed_train_grad.py   (exit 1: reproduced, 0: fixed, 2: not this CPU)
Uses bitsandbytes and torch only."""

import sys
import traceback

import bitsandbytes as bnb
import torch

if not bnb.functional.has_avx512bf16():
    print("not reproducible here: bitsandbytes reports no AVX512-BF16 on this CPU (the packed layout is off)")
    sys.exit(2)
torch.manual_seed(0)
layer = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4", module=layer)
layer.bias.requires_grad_(False)
layer = layer.to("cpu").eval()
x = torch.randn(3, 64)
with torch.no_grad():
    layer(x)  # repacks: quant_state.packing_format_for_cpu is now True
assert layer.weight.quant_state.packing_format_for_cpu
layer.train()
try:
    y = layer(x.clone().requires_grad_(True))
    y.sum().backward()
except RuntimeError as exc:
    traceback.print_exc()
    print(f"reproduced (bitsandbytes {bnb.__version__}, torch {torch.__version__}): RuntimeError: {exc}")
    sys.exit(1)
print(f"fixed: bitsandbytes {bnb.__version__} ran a train-mode forward with a grad-requiring input after a repack")
