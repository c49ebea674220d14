"""Float64 "expected output" of an adapter layer, and the analytic bound on how far it may be off.

Every check that compares numbers goes through here, so the error model lives in one place:

- the *value* is computed in float64 from what the layer stores: the dequantized base weight
  (``conformance.quant.dequantize``), the base bias, and the adapter's tensors read through the
  protocol (``adapter_parameters``) plus the config parameters the check passed to ``make_layer``;
- the *bound* is the sum of a quantization term (``conformance.quant.output_bound`` with
  ``weight_bound`` of a layer's state: used when a merge requantized the weight) and rounding
  terms for the dtypes the computation runs in (``conformance.quant.matmul_rounding_bound`` and
  Higham's ``gamma``), propagated through each step with the triangle inequality.

The model of *how* bitsandbytes computes a forward (read from bitsandbytes 0.50 sources) is:

- ``Linear4bit``: ``x`` cast to ``compute_dtype``, weight dequantized to it, ``linear`` (accumulate
  in >= float32), bias added in ``compute_dtype``, result cast back to the input dtype;
- ``Linear8bitLt`` in training mode (``MatMul8bitFp``): weight ``CB * (SCB/127)`` in the input
  dtype, ``linear`` in the input dtype;
- ``Linear8bitLt`` in eval mode (``MatMul8bitLt``): the *input* is quantized row-wise to int8 too
  (``|x - x_q| <= absmax_row/254`` after a float16 cast), int32 accumulation (exact), float32
  dequantization with the constant ``6.200124e-05`` (bitsandbytes' ``int8_mm_dequant``; note it
  is ``1/127**2`` only to 1.8e-5 relative -- the bound carries that offset explicitly, see
  ``INT8_DEQUANT_SCALE_ERROR``), result cast to the input dtype.

OFT rotations computed with the exact Cayley transform are a linear solve; the bound on the
computed rotation (``rotation_error``) is the LU backward-error result (Higham, *Accuracy and
Stability of Numerical Algorithms*, Thm 9.4): ``(A + dA) x = b`` with ``|dA| <= gamma_3b |L||U|``,
and ``||(I + Q)^{-1}||_2 <= 1`` for skew-symmetric ``Q``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conformance.quant import bounds as qb
from conformance.quant import layers as ql
from conformance.reference import rotation

U32 = qb.unit_roundoff(torch.float32)
U16 = qb.unit_roundoff(torch.float16)
# bitsandbytes backends/default/ops.py int8_mm_dequant multiplies by 6.200124e-05 instead of 1/127**2
INT8_DEQUANT_SCALE_ERROR = abs(float(torch.tensor(6.200124e-05, dtype=torch.float32)) * 127**2 - 1)

_CONTAINS = {
    torch.float64: {torch.float64, torch.float32, torch.float16, torch.bfloat16},
    torch.float32: {torch.float32, torch.float16, torch.bfloat16},
    torch.float16: {torch.float16},
    torch.bfloat16: {torch.bfloat16},
}


def cast_error(src: torch.dtype, dst: torch.dtype) -> float:
    """Relative error of casting a ``src`` value to ``dst`` (0 when ``dst`` holds every ``src`` value)."""
    return 0.0 if src in _CONTAINS.get(dst, {dst}) else qb.unit_roundoff(dst)


def _gamma(n: int, dtype: torch.dtype) -> float:
    return qb.gamma(max(n, 1), qb.unit_roundoff(dtype))


@dataclass
class Expected:
    """A float64 expected value and an elementwise bound on |computed - value|."""

    value: torch.Tensor
    bound: torch.Tensor

    def error(self, got: torch.Tensor) -> torch.Tensor:
        return (got.detach().double().cpu().reshape(self.value.shape) - self.value).abs()

    def ratio(self, got: torch.Tensor) -> float:
        """max |got - value| / bound over elements (inf if a bound-0 element differs, nan if got is non-finite)."""
        err = self.error(got)
        if not torch.isfinite(err).all():
            return math.nan
        with torch.no_grad():
            r = torch.where(self.bound > 0, err / self.bound.clamp_min(1e-300),
                            torch.where(err > 0, torch.full_like(err, math.inf), torch.zeros_like(err)))
        return float(r.max()) if r.numel() else 0.0

    def describe(self, got: torch.Tensor) -> str:
        """Where the worst element is: got vs expected and the bound there."""
        err = self.error(got)
        if not torch.isfinite(err).all():
            return f"non-finite output ({int((~torch.isfinite(err)).sum())} elements)"
        r = err / self.bound.clamp_min(1e-300)
        i = int(r.flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), r.shape))
        g = got.detach().double().cpu().reshape(self.value.shape).flatten()[i]
        return (f"at {idx}: got {float(g):.8g}, expected {float(self.value.flatten()[i]):.8g} "
                f"(|diff| {float(err.flatten()[i]):.3g} > bound {float(self.bound.flatten()[i]):.3g}, "
                f"ratio {float(r.flatten()[i]):.3g})")

    def __add__(self, other: Expected) -> Expected:
        return Expected(self.value + other.value, self.bound + other.bound)


# -- base layer ------------------------------------------------------------------------------

def base_weights(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of a quantized base layer in float64: the dequantized stored weight and the bias."""
    w = ql.dequantize(base).double().cpu()
    b = getattr(base, "bias", None)
    return w, None if b is None else b.detach().double().cpu()


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def linear_expected(
    base: nn.Module,
    x_value: torch.Tensor,
    x_dtype: torch.dtype,
    *,
    x_err: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_err: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias_err: torch.Tensor | None = None,
    training: bool | None = None,
) -> Expected:
    """Expected ``base(x_hat)`` where ``|x_hat - x_value| <= x_err`` and ``x_hat`` has dtype ``x_dtype``.

    ``weight``/``bias`` default to what ``base`` stores now (``weight_err`` 0); pass the weight a
    merge *should* have produced plus the bound on how far the stored one may be from it to check
    a merged layer. ``training`` overrides ``base.training`` (8-bit eval mode quantizes the input).
    """
    w_st, b_st = base_weights(base)
    w = w_st if weight is None else weight.double().cpu()
    b = b_st if bias is None else bias.double().cpu()
    xv = x_value.double().cpu()
    xe = torch.zeros_like(xv) if x_err is None else x_err.double().cpu()
    we = torch.zeros_like(w) if weight_err is None else weight_err.double().cpu()
    be = None if b is None else (torch.zeros_like(b) if bias_err is None else bias_err.double().cpu())
    value = xv @ w.t() + (b if b is not None else 0.0)
    x_abs = xv.abs() + xe  # bounds |x_hat|
    w_abs = w.abs() + we   # bounds |W_stored|
    b_abs = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.abs() + be
    # propagated uncertainty of the inputs, weight and bias
    bound = xe @ w_abs.t() + xv.abs() @ we.t() + (0.0 if be is None else be)
    mag = x_abs @ w_abs.t()
    bits = ql.bits_of(base)
    is_training = base.training if training is None else training
    if bits == 4:
        c = base.compute_dtype or x_dtype
        bound = bound + cast_error(x_dtype, c) * mag
        bound = bound + qb.matmul_rounding_bound(x_abs, w_abs, c)
        b_dtype = base.bias.dtype if b is not None else c
        bound = bound + cast_error(b_dtype, c) * b_abs + qb.unit_roundoff(c) * (mag + b_abs)
        bound = bound + cast_error(c, x_dtype) * (mag + b_abs) * (1 + 3 * qb.unit_roundoff(c))
    elif is_training and base.weight.device.type in ("cpu", "xpu"):
        # bitsandbytes autograd/_functions.py matmul(): MatMul8bitFp only on cpu/xpu in training mode;
        # CUDA always takes MatMul8bitLt, the int8 x int8 path below (the input is quantized too)
        d = x_dtype
        # CB.to(d) * (SCB * (1/127)): two roundings in d; the stored (float32) weight two in float32
        bound = bound + (2 * qb.unit_roundoff(d) + 2 * U32) * mag
        bound = bound + qb.matmul_rounding_bound(x_abs, w_abs, d)
        b_dtype = base.bias.dtype if b is not None else d
        bound = bound + cast_error(b_dtype, d) * b_abs + qb.unit_roundoff(d) * (mag + b_abs)
    else:
        d = x_dtype
        x16 = x_abs * (1 + cast_error(d, torch.float16))
        s_x = _rowwise(x16).max(dim=-1).values  # row absmax after the float16 cast
        s_x = s_x.reshape(*x_abs.shape[:-1], 1) if x_abs.dim() > 1 else s_x.reshape(1)
        bound = bound + cast_error(d, torch.float16) * mag
        bound = bound + (s_x / 254) * w_abs.sum(dim=1)          # input quantization
        bound = bound + 2 * U32 * mag                           # stored weight vs CB*SCB/127
        y_abs = mag + (s_x / 254) * w_abs.sum(dim=1)
        # float32 dequant: (row*col) * const * acc, the constant's offset, bias add, cast to d
        bound = bound + (3 * U32 + INT8_DEQUANT_SCALE_ERROR) * y_abs * 1.0001
        bound = bound + U32 * (y_abs + b_abs) + cast_error(torch.float32, d) * (y_abs + b_abs) * 1.0001
    return Expected(value, bound)


def base_expected(base: nn.Module, x: torch.Tensor, training: bool | None = None) -> Expected:
    """Expected output of the unadapted base layer for input ``x``."""
    return linear_expected(base, x.detach(), x.dtype, training=training)


# -- LoRA ------------------------------------------------------------------------------------

def lora_scaling(params: Mapping[str, Any]) -> float:
    """``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``), PEFT's defaults r=8, lora_alpha=8."""
    r = params.get("r", 8)
    alpha = params.get("lora_alpha", 8)
    return alpha / (math.sqrt(r) if params.get("use_rslora", False) else r)


def lora_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    a = tensors["lora_A.weight"].detach().double().cpu()
    b = tensors["lora_B.weight"].detach().double().cpu()
    bb = tensors.get("lora_B.bias")
    return a, b, None if bb is None else bb.detach().double().cpu()


def lora_delta(tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """Exact ``scaling * B @ A`` in float64."""
    a, b, _ = lora_tensors(tensors)
    return scaling * (b @ a)


def lora_delta_error(tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """Bound on |computed scaling*(B@A) - exact| when computed in the adapter dtype."""
    a, b, _ = lora_tensors(tensors)
    dt = tensors["lora_A.weight"].dtype
    r = a.shape[0]
    mag = abs(scaling) * (b.abs() @ a.abs())
    return (_gamma(r, dt) + qb.unit_roundoff(dt)) * mag * (1 + qb.unit_roundoff(dt))


def lora_path(
    tensors: Mapping[str, torch.Tensor], scaling: float, x: torch.Tensor, out_dtype: torch.dtype
) -> Expected:
    """Expected ``scaling * (B(Ax) + b_B)`` and the rounding bound of computing it in the adapter dtype
    and casting it to ``out_dtype``."""
    a, b, bb = lora_tensors(tensors)
    dt = tensors["lora_A.weight"].dtype
    u = qb.unit_roundoff(dt)
    xv = x.detach().double().cpu()
    x_abs = xv.abs()
    h = xv @ a.t()
    mag_h = x_abs @ a.abs().t()
    e_h = cast_error(x.dtype, dt) * mag_h + _gamma(a.shape[1], dt) * mag_h * (1 + cast_error(x.dtype, dt))
    z = h @ b.t() + (bb if bb is not None else 0.0)
    bb_abs = 0.0 if bb is None else bb.abs()
    mag_z = (mag_h + e_h) @ b.abs().t() + bb_abs
    e_z = e_h @ b.abs().t() + _gamma(b.shape[1] + 1, dt) * mag_z
    s = abs(scaling)
    e_s = s * e_z + u * s * (mag_z + e_z)
    mag_s = s * (mag_z + e_z) + e_s
    e_s = e_s + cast_error(dt, out_dtype) * mag_s
    return Expected(scaling * z, e_s)


def lora_expected(
    layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor, *, training: bool | None = None
) -> Expected:
    """Expected ``base(x) + scaling*(B(Ax) + b_B)`` of an implementation's LoRA layer (unmerged)."""
    base = layer.base_layer
    tensors = layer.adapter_parameters(name)
    scaling = lora_scaling(params)
    y0 = base_expected(base, x, training=training)
    out_dtype = x.dtype
    path = lora_path(tensors, scaling, x, out_dtype)
    add = qb.unit_roundoff(out_dtype) * (y0.value.abs() + y0.bound + path.value.abs() + path.bound)
    return Expected(y0.value + path.value, y0.bound + path.bound + add)


# -- OFT -------------------------------------------------------------------------------------

def oft_layout(in_features: int, params: Mapping[str, Any]) -> tuple[int, int]:
    """(number of blocks, block size) from OFT params (exactly one of r / oft_block_size set)."""
    r = params.get("r", 8)
    bs = params.get("oft_block_size", 0)
    if r:
        return r, in_features // r
    return in_features // bs, bs


def oft_blocks(tensors: Mapping[str, torch.Tensor], block_size: int, neumann_terms: int | None = None) -> torch.Tensor:
    """(k, b, b) float64 Cayley rotation blocks of an OFT adapter's stored parameters."""
    p = tensors["oft_R.weight"].detach().double().cpu()
    return rotation.cayley(rotation.skew(p, block_size), neumann_terms=neumann_terms)


def lu_growth(a: torch.Tensor) -> torch.Tensor:
    """|| |L||U| ||_2 per matrix of a (k, n, n) float64 batch (partial pivoting)."""
    _, lo, up = torch.linalg.lu(a)
    return torch.linalg.matrix_norm(lo.abs() @ up.abs(), ord=2)


def rotation_error(tensors: Mapping[str, torch.Tensor], block_size: int) -> torch.Tensor:
    """Per-block bound on ||R_computed - R_exact||_F for the exact Cayley path in the parameter dtype.

    R solves ``R (I + Q) = I - Q`` (or the transposed system). Each of the b right-hand sides
    ``j`` gets its own backward error ``|dA_j| <= gamma_3b |L||U|``; with ``||A^{-1}||_2 <= 1``,
    ``||r_j - r_j_exact|| <= ||dA_j||_2 ||r_j||``, so ``||R_c - R||_F <= g ||R_c||_F`` with
    ``g = gamma_3b || |L||U| ||_2`` and ``||R||_F = sqrt(b)``: ``||R_c - R||_F <= g sqrt(b)/(1-g)``.
    ``I +- Q`` are formed exactly (one nonzero per off-diagonal entry).
    """
    p = tensors["oft_R.weight"].detach()
    q = rotation.skew(p.double().cpu(), block_size)
    eye = torch.eye(block_size, dtype=torch.float64).expand_as(q)
    growth = torch.maximum(lu_growth(eye + q), lu_growth(eye - q))
    g = qb.gamma(3 * block_size, qb.unit_roundoff(p.dtype)) * growth
    return g * math.sqrt(block_size) / (1 - g)


def inverse_rotation_error(tensors: Mapping[str, torch.Tensor], block_size: int) -> torch.Tensor:
    """Per-block bound on ||Rinv_computed - R^T||_F when unmerge inverts the computed rotation.

    ``R_c = R + E`` (``||E||_F <= d``, ``rotation_error``) has ``||R_c^{-1} - R^T||_2 <= d/(1-d)``;
    solving with ``R_c`` in float32 adds the LU backward error ``gamma_3b(u32) || |L||U| ||_2``
    (of ``R``) times ``||R_c^{-1}||_F <= sqrt(b)/(1-d)``.
    """
    d = rotation_error(tensors, block_size)
    r = oft_blocks(tensors, block_size)
    g = qb.gamma(3 * block_size, U32) * lu_growth(r)
    return d / (1 - d) + g * math.sqrt(block_size) / (1 - d) / (1 - g)


def expand_blocks(per_block: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """(k,) per-block values -> (n_blocks*block_size,) per-feature values (k == 1: shared)."""
    if per_block.numel() == 1:
        per_block = per_block.reshape(1).expand(n_blocks)
    return per_block.repeat_interleave(block_size)


def block_norms(m: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """(..., n) -> (..., n) with each entry replaced by the 2-norm of its block of the last dim."""
    mb = m.double().reshape(*m.shape[:-1], n_blocks, block_size)
    return torch.linalg.vector_norm(mb, dim=-1).repeat_interleave(block_size, dim=-1)


def rotate_error(
    m: torch.Tensor, r_abs: torch.Tensor, delta: torch.Tensor, n_blocks: int, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Bound on |m R_computed - m R| (rows of ``m`` rotated block-wise, computed in ``dtype``).

    ``|m_blk (R_c - R)_col| <= ||m_blk||_2 * delta_blk`` plus the dot-product rounding
    ``gamma_b |m| (|R| + delta)``. Used for OFT's input rotation (``x R``) and merge (``W R^T``:
    pass ``R^T``'s magnitudes; the block norms are the same).
    """
    d = expand_blocks(delta, n_blocks, block_size)
    mv = m.double().cpu()
    return block_norms(mv, n_blocks, block_size) * d + _gamma(block_size, dtype) * (mv.abs() @ (r_abs + d))


def oft_rotation(tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int) -> torch.Tensor:
    """The exact block-diagonal rotation (in x in) in float64."""
    return rotation.block_diagonal(oft_blocks(tensors, block_size), n_blocks)


def oft_expected(
    layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor, *, training: bool | None = None
) -> Expected:
    """Expected ``base(x R)`` of an implementation's OFT layer (exact Cayley path, no COFT).

    The rotation is applied in the parameter dtype and cast back to the input dtype (what the
    reference and PEFT do); the bound covers that and the solve error of the rotation.
    """
    base = layer.base_layer
    tensors = layer.adapter_parameters(name)
    n_blocks, bs = oft_layout(base.in_features, params)
    r = oft_rotation(tensors, n_blocks, bs)
    pdt = tensors["oft_R.weight"].dtype
    delta = rotation_error(tensors, bs)
    xv = x.detach().double().cpu()
    xr = xv @ r
    err = cast_error(x.dtype, pdt) * (xv.abs() @ r.abs())
    err = err + rotate_error(xv, r.abs(), delta, n_blocks, bs, pdt)
    err = err + cast_error(pdt, x.dtype) * (xr.abs() + err)
    return linear_expected(base, xr, x.dtype, x_err=err, training=training)


def expected(
    layer: nn.Module, method: str, name: str, params: Mapping[str, Any], x: torch.Tensor,
    *, training: bool | None = None,
) -> Expected:
    """Dispatch to ``lora_expected`` / ``oft_expected``."""
    if method == "lora":
        return lora_expected(layer, name, params, x, training=training)
    if method == "oft":
        return oft_expected(layer, name, params, x, training=training)
    raise ValueError(f"unknown method {method!r}")


# -- merges ----------------------------------------------------------------------------------

def lora_merged_weight(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(W0 + scaling*B@A exactly, bound on the float32 arithmetic of forming it; requantization excluded)."""
    delta = lora_delta(tensors, scaling)
    target = w0.double() + delta
    err = lora_delta_error(tensors, scaling) + U32 * (target.abs() + lora_delta_error(tensors, scaling))
    return target, err


def oft_merged_weight(
    w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0 R^T exactly, bound on computing it in float32 with the computed rotation)."""
    r = oft_rotation(tensors, n_blocks, block_size)
    delta = rotation_error(tensors, block_size)
    target = w0.double() @ r.t()
    err = rotate_error(w0, r.t().abs(), delta, n_blocks, block_size, torch.float32)
    return target, err + U32 * (target.abs() + err)


def oft_unmerge_error(
    w1: torch.Tensor, tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int
) -> torch.Tensor:
    """Bound on |computed W1 R^{-T} - W1 R| (unmerge with the computed rotation's inverse)."""
    r = oft_rotation(tensors, n_blocks, block_size)
    d = inverse_rotation_error(tensors, block_size)
    err = rotate_error(w1, r.abs(), d, n_blocks, block_size, torch.float32)
    return err + U32 * ((w1.double() @ r).abs() + err)


# -- adapter parameters for checks ----------------------------------------------------------

def fill_adapter(layer: nn.Module, name: str, gen: torch.Generator, *, scale: float = 1.0) -> None:
    """Overwrite an adapter's tensors (read through ``adapter_parameters``) with seeded random values.

    LoRA: ``A ~ N(0, 1/in)``, ``B ~ N(0, 1/r) * 0.2 * scale``, ``b_B ~ N(0, 0.01)``; OFT: the
    upper-triangle parameters ``~ N(0, 0.05 * scale)``. Checks use it so that the adapter is
    non-trivial whatever the implementation's own initialisation is.
    """
    tensors = layer.adapter_parameters(name)
    with torch.no_grad():
        for key, p in tensors.items():
            if key == "lora_A.weight":
                v = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            elif key == "lora_B.weight":
                v = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5 * 0.2 * scale
            elif key == "lora_B.bias":
                v = torch.randn(p.shape, generator=gen) * 0.1
            elif key == "oft_R.weight":
                v = torch.randn(p.shape, generator=gen) * 0.05 * scale
            else:
                continue
            p.copy_(v.to(device=p.device, dtype=p.dtype))


def set_skew_norm(layer: nn.Module, name: str, block_size: int, norm2: float, gen: torch.Generator) -> float:
    """Random OFT parameters scaled so every block's ``||Q||_2`` equals ``norm2``; returns it."""
    p = layer.adapter_parameters(name)["oft_R.weight"]
    v = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    q = rotation.skew(v, block_size)
    s = torch.linalg.matrix_norm(q, ord=2)
    v = v * (norm2 / s)[:, None]
    with torch.no_grad():
        p.copy_(v.to(device=p.device, dtype=p.dtype))
    q = rotation.skew(p.detach().double().cpu(), block_size)
    return float(torch.linalg.matrix_norm(q, ord=2).max())


# -- merge targets used by the merge and safe-merge clauses ---------------------------------

def merge_target(
    layer: nn.Module, method: str, name: str, params: Mapping[str, Any], w0: torch.Tensor, b0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(W, W_err, b, b_err): what merging adapter ``name`` into (w0, b0) should give, exactly, and the
    bound on the float32 arithmetic of forming it (requantization excluded: add ``weight_bound``).

    LoRA's bias (``lora_bias``) merges as ``b + scaling * b_B`` (PEFT's unquantized ``Linear``), rounded
    to the base bias dtype.
    """
    tensors = layer.adapter_parameters(name)
    if method == "lora":
        s = lora_scaling(params)
        w, we = lora_merged_weight(w0, tensors, s)
        bb = tensors.get("lora_B.bias")
        if bb is None or b0 is None:
            return w, we, b0, None if b0 is None else torch.zeros_like(b0)
        sb = s * bb.detach().double().cpu()
        bt = b0.double() + sb
        u_b = qb.unit_roundoff(layer.base_layer.bias.dtype)
        be = U32 * (sb.abs() + bt.abs()) * 2 + u_b * bt.abs() * (1 + U32)
        return w, we, bt, be
    n_blocks, bs = oft_layout(w0.shape[1], params)
    w, we = oft_merged_weight(w0, tensors, n_blocks, bs)
    return w, we, b0, None if b0 is None else torch.zeros_like(b0)


def roundtrip_bound(
    layer: nn.Module, method: str, name: str, params: Mapping[str, Any],
    first_err: torch.Tensor, w1: torch.Tensor, wb2: torch.Tensor,
) -> torch.Tensor:
    """Bound on |W_after_unmerge - W0| given ``first_err`` >= |W1 - merge target| (requantization 1 plus
    merge arithmetic), the merged weight ``w1`` and the second requantization's ``weight_bound``.

    LoRA: ``W2 = Q(W1 - dW)`` so ``|W2 - W0| <= first_err + arith(W1 - dW) + wb2``. OFT: ``W2 = Q(W1 R)``
    (the inverse rotation; ``R^{-T} = R``) so the first error passes through ``|R|``.
    """
    tensors = layer.adapter_parameters(name)
    if method == "lora":
        s = lora_scaling(params)
        de = lora_delta_error(tensors, s)
        w2t = w1.double() - lora_delta(tensors, s)
        return first_err + de + U32 * (w2t.abs() + de) + wb2
    n_blocks, bs = oft_layout(w1.shape[1], params)
    r = oft_rotation(tensors, n_blocks, bs)
    return first_err @ r.abs() + oft_unmerge_error(w1, tensors, n_blocks, bs) + wb2
