"""bitsandbytes 0.50.x, a CUDA device: an 8-bit weight kept in float16 (`Int8Params(..., has_fp16_weights=True)`,
bitsandbytes' default) built on the CPU and moved with `.to("cuda")` comes back as a plain tensor, not a parameter:
`Int8Params._quantize` returns `super().to(device)` for a float16 weight. Assigning it as a layer's weight raises
"cannot assign 'torch.cuda.HalfTensor' as parameter 'weight'", which is how an 8-bit merge writes its result
(`layer.weight = bnb.nn.Int8Params(w.to("cpu"), has_fp16_weights=...).to(device)`, PEFT 0.21 `lora/bnb.py`).

Run: python xfails/bitsandbytes/int8_fp16_weights_to_device.py   (exit 1: reproduced, 0: fixed, 2: not this machine)
Uses bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import torch

if not torch.cuda.is_available():
    print("not reproducible here: needs a CUDA device")
    sys.exit(2)
torch.manual_seed(0)
layer = bnb.nn.Linear8bitLt(64, 48, bias=False, has_fp16_weights=True).cuda()
moved = bnb.nn.Int8Params(torch.randn(48, 64).half(), requires_grad=False, has_fp16_weights=True).to("cuda")
kind = f"{type(moved).__module__}.{type(moved).__name__}"
try:
    layer.weight = moved
    outcome, wrong = f"assigned as the layer's weight ({kind})", not isinstance(moved, bnb.nn.Int8Params)
except TypeError as exc:
    outcome, wrong = f"assigning it as the layer's weight raised TypeError: {exc}", True
print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}: Int8Params(has_fp16_weights=True).to('cuda') "
      f"returned {kind}; {outcome}")
if wrong:
    print("reproduced: a float16 Int8Params moved to CUDA is no longer a parameter")
    sys.exit(1)
print("fixed: the moved float16 Int8Params is still an Int8Params")
