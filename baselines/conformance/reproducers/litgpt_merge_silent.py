#!/usr/bin/env python
"""LitGPT: ``LoRALinear.merge()`` into a quantized base is silent: no rounding warning, no warning on a
second merge, and a non-finite adapter is merged without a word.

Plain torch + bitsandbytes + litgpt, no conformance import. Found by ``MERGE-WARNS-LORA``,
``MERGE-TWICE-WARNS`` and ``SAFE-UNSAFE-WARNS`` (``--impl litgpt``). ``litgpt/lora.py`` (0.5.13)
``LoRALinear.merge`` emits no warning (PEFT warns "Merge lora module to 4-bit linear may get different
generations due to rounding errors."), returns silently when already merged (``if ... not
self.merged``), and has no safe-merge check, so NaN/Inf in ``lora_A``/``lora_B`` land in the weight.

Run: ``python litgpt_merge_silent.py [cpu|cuda]``. Exit 1 while any of the three reproduces.
"""

import math
import sys
import warnings
from importlib import metadata

import bitsandbytes as bnb
import torch
from litgpt.lora import LoRALinear


def layer_on(device: str) -> LoRALinear:
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.support_avx512bf16_for_cpu = False
    layer = LoRALinear(64, 48, r=4, lora_alpha=16).to(device)
    layer.linear = base.to(device)  # where Lightning Fabric's BitsandbytesPrecision puts its bnb layer
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
    return layer


def merge_recorded(layer: LoRALinear) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        layer.merge()
    return [str(w.message) for w in got]


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"litgpt {metadata.version('litgpt')}, bitsandbytes {bnb.__version__}, torch {torch.__version__}, {device}")
    torch.manual_seed(0)
    found = []
    layer = layer_on(device)
    first = merge_recorded(layer)
    print("first merge into nf4, warnings:", first)
    if not any("round" in m.lower() or "quant" in m.lower() for m in first):
        found.append("merging into a 4-bit base emits no rounding/quantization warning")
    second = merge_recorded(layer)
    print("second merge, warnings:", second)
    if not second:
        found.append("merging an already merged adapter is a silent no-op")
    bad = layer_on(device)
    with torch.no_grad():
        bad.lora_A[0, 0] = float("nan")
    try:
        msgs = merge_recorded(bad)
    except Exception as exc:  # noqa: BLE001 - raising is the wanted outcome here
        print(f"NaN adapter: merge raised {type(exc).__name__}: {exc}")
    else:
        w = bad.linear.weight
        print(f"NaN adapter: merge returned, warnings {msgs}, weight holds NaN: {bool(torch.isnan(w.float()).any())}")
        if not any("nan" in m.lower() or "finite" in m.lower() for m in msgs):
            found.append("a NaN adapter is merged without an error or a warning naming it")
    for f in found:
        print("REPRODUCED:", f)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
