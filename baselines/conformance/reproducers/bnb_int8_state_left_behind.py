#!/usr/bin/env python
"""bitsandbytes: ``.to()`` on a module *containing* a ``Linear8bitLt`` leaves its int8 statistics behind.

Plain torch + bitsandbytes, no conformance import. Found by the stateful machine
(``STATE-VALID-NEVER-RAISES``, step ``layer.to(...)``) for PEFT's LoRA/OFT 8-bit layers, which are
exactly such parents. ``Linear8bitLt.to()`` moves ``state.CB``/``state.SCB`` itself, but a parent's
``nn.Module._apply`` calls ``Int8Params.to()`` and keeps only the moved *data*
(``param.data = moved``): the weight's ``CB``/``SCB`` attributes and the layer's ``state`` still
point at the old device, and the next forward writes ``state.CB`` back into the weight.

Run on a machine with CUDA: ``python bnb_int8_state_left_behind.py [--forward]``. Exit 1 when
tensors are left behind (the behaviour reproduces), 0 when the move carried everything.
``--forward`` then runs a forward on the moved layer, which on bitsandbytes 0.50.2 / torch 2.11
(H100) is what the CUDA illegal memory access of the stateful machine came from; it may kill the
process or leave CUDA unusable.
"""

import sys

import bitsandbytes as bnb
import torch
from torch import nn


def left_behind(module: nn.Module, device: str) -> list[str]:
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, bnb.nn.Linear8bitLt):
            for where, obj in (("weight", mod.weight), ("state", mod.state)):
                for k in ("CB", "SCB"):
                    t = getattr(obj, k, None)
                    if isinstance(t, torch.Tensor) and t.device.type != device:
                        out.append(f"{name}.{where}.{k} on {t.device}")
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    layer = bnb.nn.Linear8bitLt(64, 40, has_fp16_weights=False, threshold=0.0).to("cpu")  # quantizes on the CPU
    with torch.no_grad():
        layer(x)  # the first forward links state.CB/SCB to the weight's
    parent = nn.Sequential(layer).to("cuda")
    stale = left_behind(parent, "cuda")
    print("CPU-quantized layer, after nn.Sequential(layer).to('cuda'):", stale or "everything on cuda")
    back = nn.Sequential(bnb.nn.Linear8bitLt(64, 40, has_fp16_weights=False, threshold=0.0).to("cuda")).to("cpu")
    print("CUDA-quantized layer, after nn.Sequential(layer).to('cpu'):", left_behind(back, "cpu") or "everything on cpu")
    direct = bnb.nn.Linear8bitLt(64, 40, has_fp16_weights=False, threshold=0.0).to("cuda").to("cpu")
    print("for comparison, Linear8bitLt.to('cpu') on the layer itself:", left_behind(direct, "cpu") or "everything on cpu")
    if "--forward" in sys.argv and stale:
        try:
            with torch.no_grad():
                parent(x.cuda())
            torch.cuda.synchronize()
            print("forward after the move ran without an error")
        except Exception as exc:  # the divergence itself: report it, do not hide it
            print(f"forward after the move raised {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
