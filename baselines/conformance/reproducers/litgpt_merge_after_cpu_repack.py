#!/usr/bin/env python
"""LitGPT 0.5.13 + bitsandbytes 0.50.x on a CPU with AVX512-BF16: ``LoRALinear.merge()`` after an eval-mode forward
raises AssertionError (with no message) instead of merging.

Plain torch + bitsandbytes + litgpt, no conformance import. Found by ``PATH-SEQUENCE`` (``--impl litgpt``, bases with
``cpu_packed``).

bitsandbytes repacks a ``Linear4bit`` for its CPU kernel on the first eval-mode forward whose input needs no grad
(``nn/modules.py Linear4bit.forward`` -> ``functional._convert_weight_packed_for_cpu``; the quant state is marked
``packing_format_for_cpu``). ``litgpt/lora.py LoRALinear.merge`` then reads the packed bytes with
``dequantize_4bit`` (which does not know that layout), builds ``Params4bit(weight_data, **weight.__dict__)`` (so the
new float weight carries the packed quant state) and calls ``.cuda(weight.device)``: ``Params4bit.cuda`` turns a
packed state back first (``_convert_weight_packed_for_cpu_inverse``), which asserts that the data is uint8.
(In the standard layout the same merge leaves a dense weight marked as quantized:
``litgpt_merge_4bit_not_requantized.py``.)

Run: ``python litgpt_merge_after_cpu_repack.py``. Exit 1 while it reproduces, 0 when the merge works, 2 on a CPU
where bitsandbytes does not repack (no AVX512-BF16).
"""

import math
import sys
import traceback
from importlib import metadata

import bitsandbytes as bnb
import torch
from litgpt.lora import LoRALinear


def main() -> int:
    print(f"litgpt {metadata.version('litgpt')}, bitsandbytes {bnb.__version__}, torch {torch.__version__}")
    if not bnb.functional.has_avx512bf16():
        print("not reproducible here: bitsandbytes reports no AVX512-BF16 on this CPU (the packed layout is off)")
        return 2
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = LoRALinear(64, 64, r=4, lora_alpha=16)
    layer.linear = base  # where Lightning Fabric's BitsandbytesPrecision puts its bnb layer in LitGPT's QLoRA
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))  # a trained (non-zero) B
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 64))  # the first eval-mode forward: bitsandbytes repacks the base
    print("repacked:", bool(getattr(base.weight.quant_state, "packing_format_for_cpu", False)))
    try:
        layer.merge()
    except AssertionError:
        traceback.print_exc()
        print("reproduced: LoRALinear.merge() raised AssertionError inside bitsandbytes' inverse repack")
        return 1
    print("not reproduced: merge() ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
