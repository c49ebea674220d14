"""bitsandbytes 0.50.x, CPU with AVX512-BF16: the first eval-mode no-grad forward of a Linear4bit whose
out_features is not a multiple of 32 asserts in the CPU repack ("N must be divisible by block_n").

Run: python xfails/bitsandbytes/cpu_packed_shape.py   (exit 1: reproduced, 0: fixed, 2: not this CPU)
Uses bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import torch

if not bnb.functional.has_avx512bf16():
    print("not reproducible here: bitsandbytes reports no AVX512-BF16 on this CPU (the packed layout is off)")
    sys.exit(2)
torch.manual_seed(0)
layer = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
layer.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4", module=layer)
layer = layer.to("cpu").eval()
try:
    with torch.no_grad():
        y = layer(torch.randn(3, 64))
except AssertionError as exc:
    print(f"reproduced (bitsandbytes {bnb.__version__}, torch {torch.__version__}): AssertionError: {exc}")
    sys.exit(1)
print(f"fixed: bitsandbytes {bnb.__version__} ran the eval forward of a 64->48 layer, output {tuple(y.shape)}")
