#!/usr/bin/env python
"""bitsandbytes: does ``quantize_4bit`` give the same bytes on the CPU and on CUDA?

Plain torch + bitsandbytes, no conformance import. The stateful machine met this when a layer
quantized on CUDA was moved to the CPU and a "fresh base with the same settings" was then quantized
on the CPU: the weights differed (nf4 with double quant, 32x24, blocksize 32). This script
quantizes one float32 weight on both devices for each setting and prints, per setting, how many
packed bytes and absmax values differ and the largest difference of the dequantized weights
(both dequantized on CUDA, so only the quantization differs), next to the largest code gap x
absmax (the size of one quantization step).

Run on a machine with CUDA: ``python bnb_cpu_cuda_quantize_4bit.py``. Exit 1 when some setting
differs, 0 when every setting is byte-identical.
"""

import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch


def quantize(w: torch.Tensor, device: str, quant_type: str, dq: bool, blocksize: int):
    return F.quantize_4bit(w.to(device), blocksize=blocksize, compress_statistics=dq, quant_type=quant_type)


def absmax(state) -> torch.Tensor:
    """The per-block absmax as dequantize_4bit uses it (double quant: blockwise-dequantized + offset)."""
    if state.nested:
        return F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.cuda.get_device_name()}")
    gen = torch.Generator().manual_seed(0)
    any_diff = False
    print(f"{'setting':<28} {'bytes differ':>14} {'absmax differ':>14} {'max |dW|':>10} {'one step':>10}")
    for shape in ((24, 32), (40, 64), (256, 256)):
        w = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
        for quant_type in ("nf4", "fp4"):
            for dq in (False, True):
                for blocksize in (32, 64):
                    pc, sc = quantize(w, "cpu", quant_type, dq, blocksize)
                    pg, sg = quantize(w, "cuda", quant_type, dq, blocksize)
                    nbytes = int((pc.cuda().view(torch.uint8) != pg.view(torch.uint8)).sum())
                    ac = absmax(sc).cuda()
                    ag = absmax(sg)
                    nabs = int((ac.float() != ag.float()).sum())
                    sc.to("cuda")
                    dc = F.dequantize_4bit(pc.cuda(), sc)
                    dg = F.dequantize_4bit(pg, sg)
                    step = float((sg.code.float().sort().values.diff().max()) * ag.float().max())
                    diff = float((dc - dg).abs().max())
                    any_diff |= bool(nbytes or nabs)
                    label = f"{shape[0]}x{shape[1]} {quant_type} dq={int(dq)} b{blocksize}"
                    print(f"{label:<28} {nbytes:>6}/{pc.numel():<7} {nabs:>6}/{ag.numel():<7} {diff:>10.3g} {step:>10.3g}")
    return 1 if any_diff else 0


if __name__ == "__main__":
    sys.exit(main())
