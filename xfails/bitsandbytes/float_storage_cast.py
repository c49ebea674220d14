"""bitsandbytes 0.50.x: a Linear4bit whose payload is stored as bfloat16 (quant_storage, as FSDP-QLoRA loads it) is
corrupted by `.half()`: the packed bytes are cast from bfloat16 to float16 like any floating tensor, and the layer
silently computes another function (float32 storage: the element size changes and the next forward raises).

Run: python xfails/bitsandbytes/float_storage_cast.py   (exit 1: reproduced, 0: fixed)
Uses bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import torch

torch.manual_seed(0)
layer = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                          quant_storage=torch.bfloat16)
layer.support_avx512bf16_for_cpu = False  # the standard layout on every CPU (the CPU repack is another matter)
layer.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4",
                                 quant_storage=torch.bfloat16, module=layer)
layer = layer.to("cpu")
payload = layer.weight.data.view(torch.uint8).clone()
x = torch.randn(3, 64)
with torch.no_grad():
    y0 = layer(x)
    layer.half()
    y1 = layer(x.half()).float()
now = layer.weight.data
same = now.dtype == torch.bfloat16 and torch.equal(now.view(torch.uint8), payload)
print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}: payload bfloat16 -> {now.dtype}, bytes kept: {same}; "
      f"max |y_half - y| = {(y1 - y0).abs().max().item():.3g} (|y| max {y0.abs().max().item():.3g})")
if not same:
    print("reproduced: .half() cast the 4-bit payload stored as bfloat16")
    sys.exit(1)
print("fixed: the payload survived .half()")
