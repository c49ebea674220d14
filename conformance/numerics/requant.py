"""Requantization bounds for weights nobody can observe: a merge's intermediate states.

The bound of an *observable* requantization is ``conformance.quant.weight_bound`` of the layer after
it. A multi-adapter merge/unmerge passes through states the caller never sees; their bound comes
from the exact weight instead (``requant_bound_from_exact``) or from requantizing a copy of the base
layer (``hypothetical_requant_bound``).
"""

from __future__ import annotations

import torch
from torch import nn

from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers

from .rounding import U16, U32


def _blockmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    n = flat.numel()
    pad = (-n) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, block).max(dim=1).values


def requant_bound_from_exact(base: nn.Module, exact: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Bound on one requantization's error for a weight known only as ``exact +- err``.

    Same model as ``conformance.quant.bounds.weight_bound`` with the stored statistics replaced by
    upper bounds: 4-bit block absmax ``a <= max_block(|exact| + err)``; with double quant the absmax
    error ``e_a <= absmax2 * g2 / 2`` where ``absmax2 = max |a_i - mean(a)| <= max(a)`` (all
    ``a_i >= 0``), plus the float32 offset add; 8-bit row absmax ``s <= max_row(|exact| + err)`` and
    its float16 cast (relative ``u16``, or ``FP16_SUBNORMAL_ERROR`` below float16's normal range); the same with
    ``has_fp16_weights``, where the float16 rounding happens at the merge and the int8 one at the next forward.
    """
    mag = exact.double().abs() + err.double()
    if qlayers.bits_of(base) == 4:
        qs = base.weight.quant_state
        g = qbounds.max_code_gap(qs.code)
        u = qbounds.unit_roundoff(qs.dtype)
        a = _blockmax(mag.flatten(), qs.blocksize) * (1 + 2 * u)  # the weight is cast to qs.dtype first
        if qs.nested:
            g2 = qbounds.max_code_gap(qs.state2.code)
            e_a = float(a.max()) * g2 / 2 + a * 2 * U32
        else:
            e_a = torch.zeros_like(a)
        amax = a + e_a
        per_block = amax * g / 2 + e_a + 2 * amax * u
        out, inn = exact.shape
        return per_block.repeat_interleave(qs.blocksize)[: out * inn].reshape(out, inn)
    s = mag.max(dim=1).values * (1 + U16) + qbounds.FP16_SUBNORMAL_ERROR
    per_row = s / 254 + s * (U16 + 2 * U32) + qbounds.FP16_SUBNORMAL_ERROR
    return per_row[:, None].expand_as(mag).clone()


def hypothetical_requant_bound(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight_bound`` of ``base``'s settings applied to ``weight`` (requantizes a copy; ``base`` is untouched)."""
    probe = qlayers.clone_layer(base)
    qlayers.requantize(probe, weight.float())
    return qbounds.weight_bound(probe)
