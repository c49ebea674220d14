"""bitsandbytes 0.50.x under torch.compile (inductor, CUDA): `Linear4bit.forward` (and `Linear8bitLt.forward`)
casts its bias to the input's dtype by assigning `self.bias.data` inside the forward. A layer compiled before its
first forward, with a bias of another dtype than its input (a float32 bias, float16 inputs: a checkpoint stored in
float32 run in half precision), computes the first compiled call right and every later one wrong (the H200 log:
off by 0.117, the size of a bias; 8-bit with has_fp16_weights=True by 0.518). The same layer with its bias in the
input's dtype, or after one eager forward (the cast already done), is right. The aot_eager backend on the CPU is
right too.

Run: python xfails/bitsandbytes/compile_bias_cast.py   (exit 1: reproduced, 0: fixed, 2: not this machine)
Uses bitsandbytes and torch only."""

import copy
import sys

import bitsandbytes as bnb
import torch

if not torch.cuda.is_available():
    print("not reproducible here: needs a CUDA device (inductor)")
    sys.exit(2)
dev = "cuda"


def four(qs: torch.dtype, cd: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=cd, quant_type="nf4", quant_storage=qs)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4",
                                     quant_storage=qs, module=layer)
    return layer.to(dev).eval()


def bias_like_input(layer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    layer.bias.data = layer.bias.data.to(dtype)
    return layer


def eight(fp16w: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=fp16w, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(48, 64).half() / 8, requires_grad=False, has_fp16_weights=fp16w)
    return layer.to(dev).eval()


cases = [(f"4-bit quant_storage {str(qs)[6:]}, compute {str(cd)[6:]}", lambda qs=qs, cd=cd: four(qs, cd), cd)
         for qs in (torch.uint8, torch.bfloat16, torch.float16, torch.float32) for cd in (torch.float16, torch.float32)]
cases += [(f"8-bit has_fp16_weights={w}", lambda w=w: eight(w), torch.float16) for w in (False, True)]
wrong = []
WHEN = {False: "compiled first", True: "eager forward first", "bias": "compiled first, bias in the input's dtype"}
for name, make, dt in cases:
    for warm in (False, True, "bias"):
        layer = make() if warm != "bias" else bias_like_input(make(), dt)
        twin = copy.deepcopy(layer)  # the eager yardstick, never compiled
        x = torch.randn(2, 3, 64, device=dev, dtype=dt, generator=torch.Generator(dev).manual_seed(1))
        with torch.no_grad():
            if warm is True:
                layer(x)  # one eager forward before compiling
            want = twin(x).float()
            torch._dynamo.reset()
            compiled = torch.compile(layer, backend="inductor")
            errs = []
            for _ in range(3):
                y = compiled(x).float()
                errs.append((y - want).abs().max().item() if torch.isfinite(y).all() else float("inf"))
        bad = any(e > 0.02 * want.abs().max().item() for e in errs)
        print(f"{name}, {WHEN[warm]}: max |compiled call k - eager| "
              f"{[f'{e:.3g}' for e in errs]}{'  <-- wrong' if bad else ''}", flush=True)
        if bad:
            wrong.append(f"{name} ({WHEN[warm]})")
print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}: {len(wrong)} wrong: {wrong}")
if wrong:
    print("reproduced: a compiled bitsandbytes layer whose bias the forward casts computes wrongly from its second call")
    sys.exit(1)
print("fixed (or not this configuration): every compiled call matches the eager layer")
