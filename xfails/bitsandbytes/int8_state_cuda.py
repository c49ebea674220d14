"""bitsandbytes 0.50.x, a CUDA device: after a CPU forward, a Linear8bitLt keeps its int8 weight and row statistics
in `layer.state` (`init_8bit_state` moves `weight.CB`/`SCB` there). `Linear8bitLt.to()` moves them, but
`layer.cuda()` (and `.to()` on any module holding the layer, which calls `Module._apply`, not the child's `to`) moves
the weight only: the CUDA forward then reads the CPU state (it raises, or computes on the CPU and writes the CPU CB
back into the weight).

Run: python xfails/bitsandbytes/int8_state_cuda.py   (exit 1: reproduced, 0: fixed, 2: not this machine)
Uses bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import torch

if not torch.cuda.is_available():
    print("not reproducible here: needs a CUDA device")
    sys.exit(2)
torch.manual_seed(0)
layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=0.0)
layer.weight = bnb.nn.Int8Params(torch.randn(48, 64).half() / 8, requires_grad=False, has_fp16_weights=False)
layer = layer.to("cpu").eval()
x = torch.randn(3, 64).half()
with torch.no_grad():
    y_cpu = layer(x).float()
layer.cuda()
left = [f"state.{k} on {getattr(layer.state, k).device}" for k in ("CB", "SCB")
        if getattr(layer.state, k, None) is not None and getattr(layer.state, k).device.type != "cuda"]
try:
    with torch.no_grad():
        y = layer(x.cuda())
    torch.cuda.synchronize()
    off = [f"weight on {layer.weight.device}"] if layer.weight.device.type != "cuda" else []
    err = (y.float().cpu() - y_cpu).abs().max().item()
    outcome = f"CUDA forward ran, output on {y.device}, max |y_cuda - y_cpu| = {err:.3g}; " + ", ".join(off)
    wrong = bool(off) or y.device.type != "cuda" or not err <= 0.05 * y_cpu.abs().max().item()
except Exception as exc:  # noqa: BLE001 - any exception is the defect
    outcome, wrong = f"the CUDA forward raised {type(exc).__name__}: {str(exc)[:200]}", True
print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}: after layer.cuda(): {', '.join(left) or 'state moved'}; "
      f"{outcome}")
if left or wrong:
    print("reproduced: layer.cuda() left the 8-bit state on the CPU")
    sys.exit(1)
print("fixed: layer.cuda() moved the 8-bit state with the weight")
