"""bitsandbytes 0.50.x: `Params4bit.cuda()` (what `layer.cuda()` calls) turns a 4-bit weight repacked into the CPU
packed layout back with `functional._convert_weight_packed_for_cpu_inverse`, a "best-effort" inverse: without double
quant it leaves the absmax transposed (bfloat16, shape (in/blocksize, out)), so with two or more blocks per row every
block is scaled by another block's absmax; with double quant it re-quantizes the absmax. The weight the layer holds
after the move is not the one it computed with before.

The repack is the one the first eval-mode no-grad CPU forward makes on a CPU with AVX512-BF16; elsewhere this script
calls the same function (`functional._convert_weight_packed_for_cpu`) itself. Without CUDA, `layer.cuda()` still runs
the inverse (in place, before the transfer fails): the weight is read on the CPU after it.

Run: python xfails/bitsandbytes/cpu_packed_cuda_inverse.py   (exit 1: reproduced, 0: fixed)
Uses bitsandbytes and torch only."""

import copy
import sys

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse


def weight_as_packed(layer):
    """The weight the packed CPU kernel multiplies by: the payload turned back on a copy, with the bfloat16 absmax
    the kernel reads (in block order)."""
    qs = layer.weight.quant_state
    data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data.clone(), copy.copy(qs))
    state.absmax = qs.absmax.float().t().reshape(-1).contiguous()
    state.nested, state.state2, state.offset = False, None, None
    return bnb.functional.dequantize_4bit(data, state).float()


reproduced = False
for double_quant in (False, True):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128) / 11, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer)
    layer = layer.to("cpu").eval()
    if bnb.functional.has_avx512bf16():
        with torch.no_grad():
            layer(torch.randn(3, 128))  # Linear4bit.forward repacks
        how = "by the eval forward"
    else:
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                     layer.weight.quant_state)
        how = "by functional._convert_weight_packed_for_cpu (no AVX512-BF16 here)"
    before = weight_as_packed(layer)
    try:
        layer.cuda()
        where = "on CUDA"
    except (AssertionError, RuntimeError) as exc:
        where = f"on the CPU (the transfer failed: {type(exc).__name__}: {str(exc)[:60]})"
    qs = layer.weight.quant_state
    after = bnb.functional.dequantize_4bit(layer.weight.data, qs).float().cpu()
    diff = (after - before).abs().max().item()
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, double quant {double_quant}: repacked {how}; "
          f"after layer.cuda(), read {where}: absmax {qs.absmax.dtype} {tuple(qs.absmax.shape)}, max |W_after - "
          f"W_before| = {diff:.3g} (|W| max {before.abs().max().item():.3g})")
    reproduced |= not torch.equal(after, before)
if reproduced:
    print("reproduced: layer.cuda() changed the weight of a layer in bitsandbytes' CPU packed layout")
    sys.exit(1)
print("fixed: layer.cuda() kept the weight of a layer in bitsandbytes' CPU packed layout")
