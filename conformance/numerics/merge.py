"""What a merge / unmerge should produce, exactly in float64, and the bound on its float32 arithmetic.

Requantization is excluded here: add ``conformance.quant.weight_bound`` of the layer after the merge
(observable) or ``conformance.numerics.requant`` (an intermediate state nobody can see).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from conformance.quant import bounds as qbounds

from .blocks import block_norms, oft_layout, oft_rotation, rotate_error
from .cayley import inverse_rotation_error, rotation_error
from .dora import dora_merge_error, dora_roundtrip_bound
from .expected import lora_delta, lora_delta_error, lora_scaling
from .requant import hypothetical_requant_bound
from .rounding import U32, cast_error


def lora_merge_error(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float,
                     w0_err: torch.Tensor | None = None) -> torch.Tensor:
    """Bound on |computed W0 + scaling*B@A - exact| in float32, requantization excluded (an unmerge passes
    ``-scaling``): forming the delta in the adapter dtype (``lora_delta_error``), then one float32 rounding of
    the sum. ``w0_err``: the weights the delta is added to are known only within it of ``w0`` (None: exactly)."""
    de = lora_delta_error(tensors, scaling)
    target_abs = (w0.double() + lora_delta(tensors, scaling)).abs()
    if w0_err is not None:
        target_abs = target_abs + w0_err
    return de + U32 * (target_abs + de)


def _rotation_cast(tensors: Mapping[str, torch.Tensor], block_size: int) -> float:
    """Per-block bound on rounding the rotation, computed in the parameter dtype, to float32 (``||R||_F = sqrt(b)``;
    0 where float32 holds every value of the parameter dtype, e.g. float16/bfloat16, nonzero for float64)."""
    return cast_error(tensors["oft_R.weight"].dtype, torch.float32) * math.sqrt(block_size)


def _rotate_weight_error(w: torch.Tensor, r: torch.Tensor, delta: torch.Tensor | float, n_blocks: int,
                         block_size: int, w_err: torch.Tensor | None, extra: float = 0.0) -> torch.Tensor:
    """Bound on |computed W R_c - W R| in float32 (``rotate_error``: rows rotated block-wise by a rotation within
    ``delta`` of ``R``), plus the rounding of the product; ``W`` known within ``w_err`` of ``w`` (None: exactly).
    ``extra``: a further per-block error of the rotation, counted through the rows' block norms only."""
    wv = w.double()
    w_abs, target_abs = wv.abs(), (wv @ r).abs()
    if w_err is not None:
        w_abs, target_abs = w_abs + w_err, target_abs + w_err @ r.abs()
    err = rotate_error(w_abs, r.abs(), delta, n_blocks, block_size, torch.float32)
    err = err + U32 * (target_abs + err)
    return err + block_norms(w_abs, n_blocks, block_size) * extra if extra else err


def lora_merged_weight(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(W0 + scaling*B@A exactly, bound on the float32 arithmetic of forming it; requantization excluded)."""
    return w0.double() + lora_delta(tensors, scaling), lora_merge_error(w0, tensors, scaling)


def oft_merge_error(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int,
                    w0_err: torch.Tensor | None = None) -> torch.Tensor:
    """Bound on |computed W0 R^T - W0 R^T| in float32 with the computed rotation (the rotation computed in the
    parameter dtype, then rounded to float32: ``rotation_error`` plus ``_rotation_cast``; ``w0_err``: as in
    ``lora_merge_error``)."""
    r = oft_rotation(tensors, n_blocks, block_size)
    delta = rotation_error(tensors, block_size) + _rotation_cast(tensors, block_size)
    return _rotate_weight_error(w0, r.t(), delta, n_blocks, block_size, w0_err)


def oft_merged_weight(
    w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0 R^T exactly, bound on computing it in float32 with the computed rotation)."""
    r = oft_rotation(tensors, n_blocks, block_size)
    return w0.double() @ r.t(), oft_merge_error(w0, tensors, n_blocks, block_size)


def oft_unmerge_error(
    w1: torch.Tensor, tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int,
    w1_err: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bound on |computed W1 R^{-T} - W1 R| (unmerge with the computed rotation's inverse; a rotation rounded to
    float32 from the parameter dtype counts twice, in the rotation and in its inverse; ``w1_err``: as in
    ``lora_merge_error``)."""
    r = oft_rotation(tensors, n_blocks, block_size)
    return _rotate_weight_error(w1, r, inverse_rotation_error(tensors, block_size), n_blocks, block_size, w1_err,
                                extra=2 * _rotation_cast(tensors, block_size))


def merge_target(
    layer: nn.Module, method: str, name: str, params: Mapping[str, Any], w0: torch.Tensor, b0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(W, W_err, b, b_err): what merging adapter ``name`` into (w0, b0) should give, exactly, and the
    bound on the float32 arithmetic of forming it (requantization excluded: add ``weight_bound``).

    LoRA's bias (``lora_bias``) merges as ``b + scaling * b_B`` (PEFT's unquantized ``Linear``), rounded
    to the base bias dtype. DoRA: ``f (W0 + s B A)`` (``dora.dora_merge_error``), the bias unchanged.
    """
    tensors = layer.adapter_parameters(name)
    if method == "dora":
        w, we, _ = dora_merge_error(w0, tensors, lora_scaling(params))
        return w, we, b0, None if b0 is None else torch.zeros_like(b0)
    if method == "lora":
        s = lora_scaling(params)
        w, we = lora_merged_weight(w0, tensors, s)
        bb = tensors.get("lora_B.bias")
        if bb is None or b0 is None:
            return w, we, b0, None if b0 is None else torch.zeros_like(b0)
        sb = s * bb.detach().double().cpu()
        bt = b0.double() + sb
        u_b = qbounds.unit_roundoff(layer.base_layer.bias.dtype)
        be = U32 * (sb.abs() + bt.abs()) * 2 + u_b * bt.abs() * (1 + U32)
        return w, we, bt, be
    n_blocks, bs = oft_layout(w0.shape[1], params)
    w, we = oft_merged_weight(w0, tensors, n_blocks, bs)
    return w, we, b0, None if b0 is None else torch.zeros_like(b0)


def roundtrip_bound(
    layer: nn.Module, method: str, name: str, params: Mapping[str, Any],
    first_err: torch.Tensor, w1: torch.Tensor, wb2: torch.Tensor, *,
    w0: torch.Tensor | None = None, wb1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bound on |W_after_unmerge - W0| given ``first_err`` >= |W1 - merge target| (requantization 1 plus
    merge arithmetic), the merged weight ``w1`` and the second requantization's ``weight_bound``.

    LoRA: ``W2 = Q(W1 - dW)`` so ``|W2 - W0| <= first_err + arith(W1 - dW) + wb2``. OFT: ``W2 = Q(W1 R)``
    (the inverse rotation; ``R^{-T} = R``) so the first error passes through ``|R|``. DoRA: ``W2 = Q(W1 / f - dW)``
    with the very factor ``f = m / ||W0 + dW||_c`` the merge used (PEFT caches the merge's norm for the unmerge):
    ``dora.dora_roundtrip_bound``. It needs the weight merged into (``w0``) and the first requantization's
    ``weight_bound`` (``wb1``) apart: the factor's rounding cancels between merge and unmerge, which ``first_err``
    cannot tell.
    """
    tensors = layer.adapter_parameters(name)
    if method == "dora":
        if w0 is None or wb1 is None:
            raise ValueError("roundtrip_bound of a DoRA merge needs w0= (the weight merged into: the factor's norm is "
                             "taken on it) and wb1= (weight_bound after the merge); pass both")
        s = lora_scaling(params)
        _, _, f = dora_merge_error(w0, tensors, s)
        return dora_roundtrip_bound(w0, tensors, s, f, wb1, wb2)
    if method == "lora":
        return first_err + lora_merge_error(w1, tensors, -lora_scaling(params)) + wb2
    n_blocks, bs = oft_layout(w1.shape[1], params)
    r = oft_rotation(tensors, n_blocks, bs)
    return first_err @ r.abs() + oft_unmerge_error(w1, tensors, n_blocks, bs) + wb2


def dora_pair_merged(base: nn.Module, w0: torch.Tensor, first: tuple[Mapping[str, torch.Tensor], float],
                     second: tuple[Mapping[str, torch.Tensor], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact weight after merging DoRA adapter ``first`` then ``second`` ((tensors, scaling) each) into ``w0``, the
    bound on computing it with the intermediate requantization; add ``weight_bound`` of the merged layer).

    The merged layer must compute what the unmerged one did (``dora.dora_stack_expected``): adapters in the forward's
    order, each adapter's norm on the unmerged base weight ``W0`` the forward reads, ``f_2 (f_1 (W0 + d_1) + d_2)``
    with ``f_k = m_k / ||W0 + d_k||_c`` (PEFT 0.21.2 ``DoraLinearVariant.merge_safe``: "The weight norm has to be
    based on the unmerged weight, the same way `forward` computes it"). The first merge: ``dora_merge_error`` plus one
    requantization (``hypothetical_requant_bound`` of ``base``'s settings at ``f_1 (W0 + d_1)``); the second scales
    that weight, known within it, and takes its norm on ``W0`` exactly: the ``W0`` the merge started from, which a
    merge of several adapters at once still holds before it requantizes anything. A norm taken on a ``W0`` recovered
    from the requantized merged weight (unmerging the first adapter again) is off by that requantization and is not
    covered: at 4 bits that error is a sizeable part of the norm."""
    (t1, s1), (t2, s2) = first, second
    w = w0.double().cpu()
    t_first, e_first, _ = dora_merge_error(w, t1, s1)
    e_first = e_first + hypothetical_requant_bound(base, t_first.float())
    value, bound, _ = dora_merge_error(t_first, t2, s2, w_err=e_first, norm_on=w)
    return value, bound


def bias_roundtrip_bound(b0: torch.Tensor, b_err: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    """Bound on |b_after_unmerge - b0|: the merge's and the unmerge's arithmetic (``b_err`` each) plus
    one rounding to the bias dtype each way."""
    return 2 * b_err + 2 * qbounds.unit_roundoff(bias_dtype) * b0.abs()
