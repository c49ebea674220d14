"""Memory: bytes per parameter of a stored quantized layer, and peak device memory of an operation.

What the stored layer holds (bitsandbytes 0.4x-0.50):

- 4-bit: the packed weight (two 4-bit codes per byte), one absmax per ``blocksize`` weights (fp32),
  the 16-entry code book; with double quant (``compress_statistics``) the absmax are themselves
  quantized to 8 bits in blocks of 256, with one fp32 absmax per block, a 256-entry fp32 code book
  and an fp32 offset (``quant_state.state2`` / ``quant_state.offset``).
- 8-bit: an int8 weight and one fp32 absmax per output row (``SCB``).

Claims checked (the QLoRA paper, arXiv:2305.14314 sec. 3): NF4 stores about
0.5 byte per parameter plus statistics (4 + 32/64 = 4.5 bits with blocksize 64), double quant cuts the
statistics from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bit per parameter (a saving of ~0.373 bit);
and the common claim "4-bit allows 7B models on 8GB VRAM".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from conformance.quant.layers import bits_of, scb_of


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def stored_bytes(layer: nn.Module) -> dict[str, int]:
    """Bytes of everything the quantized weight needs, by component (bias excluded)."""
    w = layer.weight
    if bits_of(layer) == 8:
        return {"weight": _nbytes(w.data), "absmax": _nbytes(scb_of(layer))}
    qs = w.quant_state
    out = {"weight": _nbytes(w.data), "absmax": _nbytes(qs.absmax), "code": _nbytes(qs.code)}
    if qs.nested:
        out["nested_absmax"] = _nbytes(qs.state2.absmax)
        out["nested_code"] = _nbytes(qs.state2.code)
        out["offset"] = _nbytes(qs.offset)
    return out


def bytes_per_param(layer: nn.Module) -> dict[str, Any]:
    """Measured bytes (and bits) per weight parameter of a stored layer, with the components."""
    n = layer.in_features * layer.out_features
    parts = stored_bytes(layer)
    total = sum(parts.values())
    stats = total - parts["weight"]
    return {
        "params": n, "bytes": total, "parts": parts, "bytes_per_param": total / n, "bits_per_param": 8 * total / n,
        "weight_bits_per_param": 8 * parts["weight"] / n, "stats_bits_per_param": 8 * stats / n,
    }


def theoretical_bits(bits: int, blocksize: int = 64, double_quant: bool = False, in_features: int | None = None,
                     nested_blocksize: int = 256) -> dict[str, float]:
    """Bits per parameter predicted by the storage formats (code books and offsets ignored)."""
    if bits == 8:
        if in_features is None:
            raise ValueError("8-bit needs in_features (one fp32 absmax per row of in_features weights)")
        return {"weight": 8.0, "stats": 32.0 / in_features, "total": 8.0 + 32.0 / in_features}
    stats = 8.0 / blocksize + 32.0 / (blocksize * nested_blocksize) if double_quant else 32.0 / blocksize
    return {"weight": 4.0, "stats": stats, "total": 4.0 + stats}


def double_quant_saving_bits(blocksize: int = 64, nested_blocksize: int = 256) -> float:
    """QLoRA sec. 3: 32/64 - (8/64 + 32/(64*256)) = 0.373 bit per parameter for blocksize 64."""
    return (theoretical_bits(4, blocksize, False)["stats"]
            - theoretical_bits(4, blocksize, True, nested_blocksize=nested_blocksize)["stats"])


def model_gib(params: float, bits_per_param: float) -> float:
    """Weight memory of a model of ``params`` parameters at ``bits_per_param`` (GiB)."""
    return params * bits_per_param / 8 / 2**30


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> dict[str, int] | None:
    """Peak allocated device memory while running ``fn`` once (CUDA only; None elsewhere).

    ``peak_bytes`` is the allocator's high-water mark (everything alive: layers, inputs, activations);
    ``extra_bytes`` is that minus what was allocated just before the call (activations, workspaces,
    saved tensors and outputs of this operation).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del out
    return {"peak_bytes": int(peak), "extra_bytes": int(peak - before), "before_bytes": int(before)}
