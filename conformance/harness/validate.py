"""Is an adapter layer's base still a well-formed bitsandbytes layer? (What a malformed layer is, in words.)

An implementation can leave a layer malformed: a merged base weight of the wrong shape or dtype, a
dense weight where a packed one belongs, a quant state that does not match the weight. The suite's
bound code would then crash on it; ``execute`` asks ``problems`` first and fails the clause with
what is wrong (e.g. ``merged base weight is 64x48, expected 48x64``) instead of reporting ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn


@dataclass(frozen=True)
class Expected:
    """What the base layer was when the layer was built."""

    bits: int
    out_features: int
    in_features: int


def expected_of(base: nn.Module) -> Expected | None:
    if isinstance(base, bnb.nn.Linear4bit):
        return Expected(4, base.out_features, base.in_features)
    if isinstance(base, bnb.nn.Linear8bitLt):
        return Expected(8, base.out_features, base.in_features)
    return None


def _shape(t: object) -> str:
    return "x".join(str(s) for s in tuple(t))  # type: ignore[arg-type]


def problems(layer: nn.Module, exp: Expected) -> list[str]:
    """What is wrong with ``layer.base_layer`` against ``exp`` (empty when it is well-formed)."""
    base = getattr(layer, "base_layer", None)
    want = f"{exp.out_features}x{exp.in_features}"
    cls = bnb.nn.Linear4bit if exp.bits == 4 else bnb.nn.Linear8bitLt
    if not isinstance(base, cls):
        return [f"base_layer is {type(base).__name__}, expected bnb.nn.{cls.__name__}"]
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor):
        return [f"base weight is {type(w).__name__}, not a tensor"]
    out: list[str] = []
    if exp.bits == 4:
        qs = getattr(w, "quant_state", None)
        if w.is_floating_point() and qs is None:
            return [f"base weight is a dense {w.dtype} {_shape(w.shape)} tensor where a packed 4-bit weight belongs"]
        if qs is None:
            return ["base weight has no quant_state"]
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
    else:
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
