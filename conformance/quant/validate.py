"""Is a quantized base layer still a valid bitsandbytes layer? (What a malformed one is, in words.)

An implementation can leave a base malformed after a merge: a merged weight of the wrong shape or
dtype, a dense weight where a packed one belongs (or one marked as quantized), a quant state that
does not match the weight, settings or storage dtypes other than the ones it was built with (a
bfloat16 checkpoint requantized from float32). ``expected_of`` records what a base is;
``problems`` / ``base_problems`` say, one line each, what is wrong now (empty when it is valid).

Two moments, two records: ``expected_of(base)`` at build time records what no forward changes
(shape, quant settings, the storage dtypes); ``expected_of(base, at_merge=True)`` right before a
merge also records what bitsandbytes' own forward may change (``Linear4bit.compute_dtype`` follows
a float32/bfloat16 input; both layers cast the bias to the input dtype), which a merge must keep.
Used by the merge clauses, the stateful machine and the harness (``clauses.context``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import bitsandbytes as bnb
import torch
from torch import nn

from .layers import double_quant_of, has_fp16_weights, is_cpu_packed, quant_settings

#: settings a forward may change (``Linear4bit.set_compute_type``): compared only when recorded at a merge
MUTABLE = ("compute_dtype", "bias_dtype")


@dataclass(frozen=True)
class Expected:
    """What a base layer was when it was recorded."""

    bits: int
    out_features: int
    in_features: int
    #: ``quant_settings`` plus the storage dtypes (``stored_dtypes``), as strings; empty: shape only
    settings: dict[str, str] = field(default_factory=dict)


def stored_dtypes(base: nn.Module) -> dict[str, str]:
    """The dtypes a valid base keeps: 4-bit packed storage, absmax; 8-bit int8 weight, SCB (``has_fp16_weights``:
    the float16 weight); the bias."""
    w = base.weight
    out: dict[str, str] = {}
    if isinstance(base, bnb.nn.Linear4bit):
        qs = getattr(w, "quant_state", None)
        if is_cpu_packed(base):
            # bitsandbytes' CPU repack views the storage as uint8 and keeps absmax in bfloat16 (no double quant):
            # the dtypes are those of the standard layout it came from and a requantization goes back to
            # (bitsandbytes 0.50.2 quantize_4bit: float32 absmax, uint8 when double-quantized)
            out["packed_dtype"] = str(getattr(qs, "original_storage_type", None) or w.dtype)
            out["absmax_dtype"] = str(torch.uint8 if double_quant_of(base) else torch.float32)
        else:
            out["packed_dtype"] = str(w.dtype)
            if qs is not None and qs.absmax is not None:
                out["absmax_dtype"] = str(qs.absmax.dtype)
    elif has_fp16_weights(base):
        # the float16 weight is all it stores; the row statistics are computed from it (state.SCB is a cache)
        out["fp16_weight_dtype"] = str(w.dtype)
    else:
        out["int8_dtype"] = str(w.dtype)
        scb = w.SCB if getattr(w, "SCB", None) is not None else getattr(base.state, "SCB", None)
        if scb is not None:
            out["scb_dtype"] = str(scb.dtype)
    if getattr(base, "bias", None) is not None:
        out["bias_dtype"] = str(base.bias.dtype)
    return out


def expected_of(base: nn.Module, *, at_merge: bool = False) -> Expected | None:
    """What ``base`` is now (None if it is no bitsandbytes layer); ``at_merge`` keeps the ``MUTABLE`` entries."""
    if isinstance(base, bnb.nn.Linear4bit):
        bits = 4
    elif isinstance(base, bnb.nn.Linear8bitLt):
        bits = 8
    else:
        return None
    try:
        settings = {k: str(v) for k, v in {**quant_settings(base), **stored_dtypes(base)}.items()}
    except Exception:  # noqa: BLE001 - an unquantized or odd base: shape checks only
        settings = {}
    if not at_merge:
        settings = {k: v for k, v in settings.items() if k not in MUTABLE}
    return Expected(bits, base.out_features, base.in_features, settings)


def _shape(t: object) -> str:
    return "x".join(str(s) for s in tuple(t))  # type: ignore[arg-type]


def problems(layer: nn.Module, exp: Expected) -> list[str]:
    """What is wrong with ``layer.base_layer`` against ``exp`` (empty when it is well-formed)."""
    return base_problems(getattr(layer, "base_layer", None), exp)


def base_problems(base: nn.Module | None, exp: Expected) -> list[str]:
    """What is wrong with the bitsandbytes layer ``base`` against ``exp`` (empty when it is valid)."""
    want = f"{exp.out_features}x{exp.in_features}"
    cls = bnb.nn.Linear4bit if exp.bits == 4 else bnb.nn.Linear8bitLt
    if not isinstance(base, cls):
        return [f"base_layer is {type(base).__name__}, expected bnb.nn.{cls.__name__}"]
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor):
        return [f"base weight is {type(w).__name__}, not a tensor"]
    out = _packed_problems(base, w, exp, want) if exp.bits == 4 else _int8_problems(base, w, exp, want)
    if out or not exp.settings:
        return out
    try:
        now = {k: str(v) for k, v in {**quant_settings(base), **stored_dtypes(base)}.items()}
    except Exception as exc:  # noqa: BLE001
        return [f"quantization settings cannot be read ({type(exc).__name__}: {exc})"]
    changed = [f"{k} {v} -> {now.get(k)}" for k, v in exp.settings.items() if now.get(k) != v]
    if changed:
        out.append("the base no longer carries its original settings: " + ", ".join(changed))
    return out


def _packed_problems(base: nn.Module, w: torch.Tensor, exp: Expected, want: str) -> list[str]:
    qs = getattr(w, "quant_state", None)
    if w.is_floating_point() and qs is None:
        return [f"base weight is a dense {w.dtype} {_shape(w.shape)} tensor where a packed 4-bit weight belongs"]
    if not isinstance(w, bnb.nn.Params4bit):
        return [f"base weight is a {type(w).__name__}, expected bnb.nn.Params4bit"]
    if qs is None:
        return ["base weight has no quant_state"]
    if w.is_floating_point() and w.numel() == exp.out_features * exp.in_features:
        return [f"base weight is a dense {w.dtype} {_shape(w.shape)} tensor marked as quantized (it has a quant_state)"]
    out: list[str] = []
    packed_cpu = is_cpu_packed(base)
    storage = (getattr(qs, "original_storage_type", None) or w.dtype) if packed_cpu else w.dtype
    if storage != w.quant_storage:
        out.append(f"packed 4-bit weight has dtype {storage}, its quant_storage is {w.quant_storage}")
    if tuple(qs.shape) != (exp.out_features, exp.in_features):
        out.append(f"merged base weight is {_shape(qs.shape)}, expected {want} (quant_state.shape)")
    need = -(-exp.out_features * exp.in_features // 2)  # packed bytes
    have = w.numel() * w.element_size()
    if have != need:
        out.append(f"packed 4-bit weight holds {have} bytes, expected {need} for {want}")
    n_blocks = -(-exp.out_features * exp.in_features // qs.blocksize)
    if qs.absmax is not None and qs.absmax.numel() != n_blocks:
        out.append(f"quant_state has {qs.absmax.numel()} absmax values, expected {n_blocks} "
                   f"({want} in blocks of {qs.blocksize})")
    if qs.blocksize != w.blocksize or qs.quant_type != w.quant_type:
        out.append(f"quant_state (blocksize {qs.blocksize}, {qs.quant_type}) does not describe the weight "
                   f"(blocksize {w.blocksize}, {w.quant_type})")
    if double_quant_of(base) != bool(w.compress_statistics):
        out.append(f"quant_state nested={double_quant_of(base)} but the weight has compress_statistics={w.compress_statistics}")
    return out


def _int8_problems(base: nn.Module, w: torch.Tensor, exp: Expected, want: str) -> list[str]:
    if has_fp16_weights(base):
        return _fp16_weight_problems(base, w, exp, want)
    out: list[str] = []
    if w.dtype != torch.int8:
        out.append(f"8-bit base weight has dtype {w.dtype}, expected torch.int8")
    if tuple(w.shape) != (exp.out_features, exp.in_features):
        out.append(f"merged base weight is {_shape(w.shape)}, expected {want}")
    scb = w.SCB if getattr(w, "SCB", None) is not None else getattr(base.state, "SCB", None)
    if scb is None:
        out.append("8-bit base has no SCB statistics")
    elif scb.numel() != exp.out_features:
        out.append(f"8-bit SCB has {scb.numel()} row scales, expected {exp.out_features}")
    return out


def _fp16_weight_problems(base: nn.Module, w: torch.Tensor, exp: Expected, want: str) -> list[str]:
    """An 8-bit base with ``has_fp16_weights``: a floating weight of the layer's shape that bitsandbytes quantizes at
    each forward, with the layer's ``MatmulLtState`` agreeing (bitsandbytes 0.50.2 ``Linear8bitLt.forward`` reads
    ``state.has_fp16_weights``, ``Int8Params`` its own flag)."""
    out: list[str] = []
    if not w.is_floating_point():
        out.append(f"8-bit base weight has dtype {w.dtype}, but it has has_fp16_weights=True (a float16 weight)")
    if tuple(w.shape) != (exp.out_features, exp.in_features):
        out.append(f"merged base weight is {_shape(w.shape)}, expected {want}")
    state = getattr(base, "state", None)
    if state is not None and bool(getattr(state, "has_fp16_weights", True)) != bool(w.has_fp16_weights):
        out.append(f"the weight has has_fp16_weights={w.has_fp16_weights} but the layer's MatmulLtState has "
                   f"{state.has_fp16_weights}")
    return out
