#!/usr/bin/env python
"""LitGPT: ``LoRALinear.merge()`` on a bitsandbytes 4-bit base leaves the merged weight dense and unquantized.

Plain torch + bitsandbytes + litgpt, no conformance import. Found by ``MERGE-FORWARD-BOUND``,
``MERGE-ROUNDTRIP``, ``MERGE-CYCLES`` and the stateful ``STATE-MERGE-MATCHES-MODEL`` (``--impl litgpt``).

``litgpt/lora.py`` (0.5.13) ``LoRALinear.merge`` dequantizes, adds ``B @ A * scaling`` and builds
``bnb.nn.Params4bit(weight_data, requires_grad=False, **weight.__dict__)``, then calls
``self.linear.weight.cuda(weight.device)`` to quantize it. Two things stop the requantization:
``weight.__dict__`` carries ``bnb_quantized=True`` (and the old ``quant_state``), so
``Params4bit.to``/``.cuda`` never call ``_quantize``; and the return value of ``.cuda()`` is
discarded. The layer is left with a dense (out x in) float weight that claims to be quantized and
holds the *pre-merge* quant state, so the merged forward either raises (CPU: ``dequantize_4bit``
reshapes the dense tensor as packed bytes) or does not compute the merged layer.

Run: ``python litgpt_merge_4bit_not_requantized.py [cpu|cuda]`` (default: cuda when available).
Exit 1 while it reproduces, 0 when the merge requantizes and the merged forward matches.
"""

import math
import sys
from importlib import metadata

import bitsandbytes as bnb
import torch
from litgpt.lora import LoRALinear


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"litgpt {metadata.version('litgpt')}, bitsandbytes {bnb.__version__}, torch {torch.__version__}, {device}")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.support_avx512bf16_for_cpu = False  # bnb's CPU-only repacking is another matter; keep the standard layout
    base = base.to(device)  # quantizes
    packed_shape = tuple(base.weight.shape)
    w0 = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()

    layer = LoRALinear(64, 48, r=4, lora_alpha=16).to(device)
    layer.linear = base  # where Lightning Fabric's BitsandbytesPrecision puts its bnb layer in LitGPT's QLoRA
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))  # a trained (non-zero) B
    x = torch.randn(3, 64, device=device)
    with torch.no_grad():
        y_unmerged = layer(x)
        expected_w = w0 + layer.get_lora_AB()
    qs_before = base.weight.quant_state

    layer.merge()
    w = layer.linear.weight
    print(f"after merge: merged={layer.merged}, weight {tuple(w.shape)} {w.dtype} (before: {packed_shape} "
          f"uint8), bnb_quantized={getattr(w, 'bnb_quantized', None)}, "
          f"same quant_state as before merge: {w.quant_state is qs_before}")
    problems = []
    if w.dtype != torch.uint8 or tuple(w.shape) != packed_shape:
        problems.append(f"merged weight is dense {tuple(w.shape)} {w.dtype}, not packed {packed_shape} uint8")
    if w.quant_state is qs_before:
        problems.append("merged weight keeps the pre-merge quant_state")
    try:
        with torch.no_grad():
            y_merged = layer(x)
        err = (y_merged - y_unmerged).abs().max().item()
        print(f"merged forward vs unmerged forward: max |diff| {err:.3g}")
        w_merged = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        werr = (w_merged - expected_w).abs().max().item()
        print(f"dequantized merged weight vs W + scaling*B@A: max |diff| {werr:.3g}")
        if not err < 0.1:
            problems.append(f"merged forward differs from the unmerged one by {err:.3g}")
    except Exception as exc:  # noqa: BLE001 - the failure is what we report
        problems.append(f"merged forward raises {type(exc).__name__}: {exc}")
    for p in problems:
        print("REPRODUCED:", p)
    if not problems:
        print("not reproduced: merge requantized and the merged forward matches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
