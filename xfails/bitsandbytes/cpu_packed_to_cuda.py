"""bitsandbytes 0.50.x, CPU with AVX512-BF16 and a CUDA device: a Linear4bit repacked by its first eval-mode no-grad
CPU forward (bitsandbytes' CPU packed layout) and then moved with `layer.to("cuda")` keeps the CPU packed layout on
CUDA (`Params4bit.to` does not turn it back; only `Params4bit.cuda` does), and the CUDA kernels ignore
`packing_format_for_cpu`: the CUDA forward raises or computes another function.

Run: python xfails/bitsandbytes/cpu_packed_to_cuda.py   (exit 1: reproduced, 0: fixed, 2: not this machine)
Uses bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import torch

if not bnb.functional.has_avx512bf16() or not torch.cuda.is_available():
    print("not reproducible here: needs a CPU with AVX512-BF16 (bitsandbytes' has_avx512bf16) and a CUDA device")
    sys.exit(2)
torch.manual_seed(0)
layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
layer.weight = bnb.nn.Params4bit(torch.randn(64, 128) / 11, requires_grad=False, quant_type="nf4", module=layer)
layer = layer.to("cpu").eval()
x = torch.randn(3, 128)
with torch.no_grad():
    y_cpu = layer(x)  # repacks into the CPU packed layout
packed = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
layer.to("cuda")
still = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
try:
    with torch.no_grad():
        y_cuda = layer(x.cuda()).cpu()
    torch.cuda.synchronize()
    err = (y_cuda - y_cpu).abs().max().item()
    scale = y_cpu.abs().max().item()
    outcome = f"max |y_cuda - y_cpu| = {err:.3g} (|y| max {scale:.3g})"
    wrong = not err <= 0.05 * scale
except Exception as exc:  # noqa: BLE001 - any exception is the defect
    outcome, wrong = f"the CUDA forward raised {type(exc).__name__}: {exc}", True
print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}: repacked on the CPU: {packed}; packed layout kept "
      f"on CUDA after .to('cuda'): {still}; {outcome}")
if not packed:
    print("not reproducible here: the eval forward did not repack the layer")
    sys.exit(2)
if still or wrong:
    print("reproduced: layer.to('cuda') moved the CPU packed layout to CUDA as it is")
    sys.exit(1)
print("fixed: layer.to('cuda') turned the CPU packed layout back and the CUDA forward matches the CPU one")
