"""bitsandbytes 0.50.x, CPU with AVX512-BF16: ``state_dict()`` of a Linear4bit that an eval-mode no-grad forward has
repacked for the CPU un-packs the weight in place (``Linear4bit._save_to_state_dict`` calls
``_convert_weight_packed_for_cpu_inverse`` on ``self.weight.data``); the next eval forward packs it again, and the
pack / unpack / pack round trip is not exact (the block absmax goes through bfloat16), so outputs after a
``state_dict()`` (every checkpoint save) differ from those before it. What transformers' ``save_pretrained`` then
writes is the round-tripped weight (xfails/transformers.ini cpu-packed-save).

Run: python xfails/bitsandbytes/cpu_packed_state_dict.py   (exit 1: reproduced, 0: fixed, 2: not this CPU)
Uses bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import torch

if not bnb.functional.has_avx512bf16():
    print("not reproducible here: bitsandbytes reports no AVX512-BF16 on this CPU (the packed layout is off)")
    sys.exit(2)
print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}")
changed = 0
for seed in range(8):
    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(128, 256) / 8, requires_grad=False, quant_type="nf4", module=lin)
    lin = lin.to("cpu").eval()
    x = torch.randn(4, 256)
    with torch.no_grad():
        before = lin(x)  # repacks
        lin.state_dict()
        after = lin(x)  # packs again
    diff = float((after - before).abs().max())
    print(f"seed {seed}: max |output after state_dict() - before| = {diff:.3g}")
    changed += diff > 0
if changed:
    print(f"DEFECT state_dict() changed the outputs of {changed} of 8 repacked layers")
    sys.exit(1)
sys.exit(0)
