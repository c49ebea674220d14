"""Float64 expected outputs of plain, LoRA and OFT layers on a quantized base, with elementwise bounds.

The model of how bitsandbytes 0.50 computes a forward is in the package docstring
(``conformance.numerics``); each branch of ``linear_expected`` follows one of its paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers

from . import ratio as nratio
from .blocks import oft_layout, oft_rotation, rotate_error
from .cayley import rotation_error
from .rounding import INT8_DEQUANT_ERROR, U32, cast_error, gamma_n, storage_rounding


@dataclass
class Expected:
    """A float64 expected value and an elementwise bound on |computed - value|."""

    value: torch.Tensor
    bound: torch.Tensor

    def error(self, got: torch.Tensor) -> torch.Tensor:
        return (got.detach().double().cpu().reshape(self.value.shape) - self.value).abs()

    def ratio(self, got: torch.Tensor) -> float:
        """max |got - value| / bound (``conformance.numerics.ratio`` conventions: never NaN)."""
        return nratio.max_ratio(self.error(got), self.bound)

    def describe(self, got: torch.Tensor) -> str:
        """Where the worst element is: got vs expected and the bound there."""
        err = self.error(got)
        if not torch.isfinite(err).all():
            return f"non-finite output ({int((~torch.isfinite(err)).sum())} elements)"
        r, i = nratio.worst(err, self.bound)
        if i < 0:
            return "empty output"
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        g = got.detach().double().cpu().reshape(self.value.shape).flatten()[i]
        return (f"at {idx}: got {float(g):.8g}, expected {float(self.value.flatten()[i]):.8g} "
                f"(|diff| {float(err.flatten()[i]):.3g} > bound {float(self.bound.flatten()[i]):.3g}, "
                f"ratio {r:.3g})")

    def __add__(self, other: Expected) -> Expected:
        return Expected(self.value + other.value, self.bound + other.bound)


# -- base layer ------------------------------------------------------------------------------

def base_weights(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of a quantized base layer in float64: the dequantized stored weight and the bias."""
    w = qlayers.dequantize(base).double().cpu()
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
    bits = qlayers.bits_of(base)
    is_training = base.training if training is None else training
    # each rounding below is relative to the magnitude of what is rounded: the exact value's magnitude
    # plus every rounding before it (``rnd``), so products of (1 + delta) need no slack factor
    if bits == 4 and qlayers.forward_is_packed(base, training=is_training):
        bound = bound + _packed_cpu_rounding(base, x_dtype, mag, b_abs, x_abs, w_abs, b)
    elif bits == 4:
        c = base.compute_dtype or x_dtype
        b_dtype = base.bias.dtype if b is not None else c
        # x cast to c, x W^T in c (its rounding model: quant.matmul_rounding_bound), bias cast to c
        ds = storage_rounding(base)  # the kernel's weight vs dequantize's (storage dtype, rounding.py)
        rnd = cast_error(x_dtype, c) * mag + ds * mag
        rnd = rnd + qbounds.matmul_rounding_bound(x_abs * (1 + cast_error(x_dtype, c)), w_abs * (1 + ds), c)
        rnd = rnd + cast_error(b_dtype, c) * b_abs
        rnd = rnd + qbounds.unit_roundoff(c) * (mag + b_abs + rnd)       # bias add in c
        bound = bound + rnd + cast_error(c, x_dtype) * (mag + b_abs + rnd)  # cast back to the input dtype
    elif is_training and base.weight.device.type in ("cpu", "xpu"):
        # bitsandbytes autograd/_functions.py matmul(): MatMul8bitFp only on cpu/xpu in training mode;
        # CUDA always takes MatMul8bitLt, the int8 x int8 path below (the input is quantized too)
        d = x_dtype
        b_dtype = base.bias.dtype if b is not None else d
        # CB.to(d) * (SCB * (1/127)): two roundings in d; the stored (float32) weight two in float32
        w_err = 2 * qbounds.unit_roundoff(d) + 2 * U32
        rnd = w_err * mag + qbounds.matmul_rounding_bound(x_abs, w_abs * (1 + w_err), d)
        rnd = rnd + cast_error(b_dtype, d) * b_abs
        bound = bound + rnd + qbounds.unit_roundoff(d) * (mag + b_abs + rnd)  # bias add in d
    else:
        d = x_dtype
        x16 = x_abs * (1 + cast_error(d, torch.float16))
        s_x = _rowwise(x16).max(dim=-1).values  # row absmax after the float16 cast
        s_x = s_x.reshape(*x_abs.shape[:-1], 1) if x_abs.dim() > 1 else s_x.reshape(1)
        bound = bound + cast_error(d, torch.float16) * mag
        bound = bound + (s_x / 254) * w_abs.sum(dim=1)          # input quantization
        bound = bound + 2 * U32 * mag                           # stored weight vs CB*SCB/127
        # |int32 acc * row * col / 127^2| = |x_q W_q^T|: |x_q| <= x16 + s_x/254, |W_q| <= w_abs (1 + 2 u32)
        y_abs = (x16 @ w_abs.t() + (s_x / 254) * w_abs.sum(dim=1)) * (1 + 2 * U32)
        # float32 dequant A*(row*col)*6.200124e-05: three roundings and the constant's offset, multiplied
        # out (rounding.INT8_DEQUANT_ERROR); the values it hands on are at most y_abs * (1 + that)
        bound = bound + INT8_DEQUANT_ERROR * y_abs
        y_dq = y_abs * (1 + INT8_DEQUANT_ERROR) + b_abs         # |float32 sum| before the bias-add rounding
        # bias add in float32 (u32 of the sum), then the cast of the rounded sum (<= y_dq (1 + u32)) to d
        bound = bound + U32 * y_dq + cast_error(torch.float32, d) * y_dq * (1 + U32)
        bound = bound + _outlier_rounding(base, xv, xe, w_abs, d, y_dq * (1 + U32) * (1 + cast_error(torch.float32, d)))
    return Expected(value, bound)


def _outlier_rounding(base: nn.Module, xv: torch.Tensor, xe: torch.Tensor, w_abs: torch.Tensor, d: torch.dtype,
                      int8_out: torch.Tensor) -> torch.Tensor | float:
    """Rounding of the LLM.int8() outlier columns of an 8-bit eval forward (bitsandbytes 0.50.2
    ``autograd/_functions.py MatMul8bitLt`` with ``state.threshold > 0`` -> ``backends/default/ops.py
    int8_mixed_scaled_mm``); 0 without a threshold.

    ``int8_vectorwise_quant`` zeroes every input value of at least the threshold (of the float16 cast) before the
    row absmax, and every column holding one in the int8 operand: those columns contribute nothing to the int8
    product, and the rest is quantized with a row absmax no larger than the one the int8 bound above assumes
    (which already sums over every column). The outlier columns are then added back in the input's dtype d:
    ``subA = x[:, cols]`` (the input as given), ``subB = (CB[:, cols] * SCB / 127).to(d)`` (one more rounding of
    the stored weight, ``cast_error(float32, d)``), ``output.addmm(subA, subB)``: a dot product of at most |cols|
    terms in d (``gamma_n``), the product rounded to d and its sum with the int8 output rounded to d. Columns that
    may hold an outlier are those where ``|x| + x_err`` reaches the threshold (a superset: the bound only grows)."""
    threshold = float(getattr(getattr(base, "state", None), "threshold", 0.0) or 0.0)
    if threshold <= 0:
        return 0.0
    x_abs = xv.abs() + xe
    rows = x_abs.reshape(-1, x_abs.shape[-1]) if x_abs.dim() > 1 else x_abs.reshape(1, -1)
    cols = (rows * (1 + cast_error(d, torch.float16)) >= threshold).any(dim=0)
    n = int(cols.sum())
    if n == 0:
        return 0.0
    mag_o = (x_abs * cols.to(x_abs.dtype)) @ w_abs.t()
    u = qbounds.unit_roundoff(d)
    e_w = cast_error(torch.float32, d)
    prod = mag_o * (1 + e_w)
    rnd = e_w * mag_o + gamma_n(n, d) * prod + u * prod * (1 + gamma_n(n, d))  # weight cast, dot product, its rounding
    return rnd + u * (int8_out + prod * (1 + gamma_n(n, d)) * (1 + u))       # the addmm's sum rounded to d


def _packed_cpu_rounding(base: nn.Module, x_dtype: torch.dtype, mag: torch.Tensor, b_abs: torch.Tensor,
                         x_abs: torch.Tensor, w_abs: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Rounding of a 4-bit forward through bitsandbytes' packed CPU kernel (0.50.2 ``backends/cpu/ops.py``
    ``gemv_4bit`` on AVX512-BF16, taken once the layer is repacked: ``autograd/_functions.py matmul_4bit``).

    ``Linear4bit.forward`` casts x to the compute dtype c; the kernel casts it on to bfloat16 and multiplies
    with the weight dequantized from the bfloat16 absmax; the result is bfloat16; ``result += bias`` (the bias
    cast to c) rounds in bfloat16; ``.to(input dtype)`` last. Relative to ``dequantize`` (which, for a repacked
    layer, already reads the bfloat16 absmax) the kernel's weight is not rounded to the storage dtype
    (``storage_rounding``) and is rounded to bfloat16 (``matmul_rounding_bound``'s weight rounding); a layer
    that repacks in this very forward was read with its float32 absmax, which the repack rounds to bfloat16
    (``quant.bounds.CPU_REPACK_ABSMAX_ERROR`` relative to the rounded value). Every rounding is relative to the magnitude of what it
    rounds, as in the standard 4-bit branch."""
    c = base.compute_dtype or x_dtype
    k = torch.bfloat16
    u = qbounds.unit_roundoff(k)
    b_dtype = base.bias.dtype if b is not None else c
    e_in = (1 + cast_error(x_dtype, c)) * (1 + cast_error(c, k)) - 1   # x -> c -> bfloat16
    repack = 0.0 if qlayers.is_cpu_packed(base) else qbounds.CPU_REPACK_ABSMAX_ERROR  # this forward's repack
    dw = (1 + repack) * (1 + storage_rounding(base)) - 1               # the kernel's weight vs dequantize's
    rnd = e_in * mag + dw * mag
    rnd = rnd + qbounds.matmul_rounding_bound(x_abs * (1 + e_in), w_abs * (1 + dw), k)
    rnd = rnd + ((1 + cast_error(b_dtype, c)) * (1 + cast_error(c, k)) - 1) * b_abs  # the bias as added
    rnd = rnd + u * (mag + b_abs + rnd)                                # bias add in bfloat16
    return rnd + cast_error(k, x_dtype) * (mag + b_abs + rnd)          # cast back to the input dtype


def base_expected(base: nn.Module, x: torch.Tensor, training: bool | None = None) -> Expected:
    """Expected output of the unadapted base layer for input ``x``."""
    return linear_expected(base, x.detach(), x.dtype, training=training)


# -- LoRA ------------------------------------------------------------------------------------

def lora_scaling(params: Mapping[str, Any]) -> float:
    """``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``), PEFT's defaults r=8, lora_alpha=8."""
    r = params.get("r", 8)
    alpha = params.get("lora_alpha", 8)
    return float(alpha) / (math.sqrt(r) if params.get("use_rslora", False) else r)


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
    u = qbounds.unit_roundoff(dt)
    mag = abs(scaling) * (b.abs() @ a.abs())
    return (gamma_n(a.shape[0], dt) + u) * mag * (1 + u)


def lora_path(
    tensors: Mapping[str, torch.Tensor], scaling: float, x: torch.Tensor, out_dtype: torch.dtype
) -> Expected:
    """Expected ``scaling * (B(Ax) + b_B)`` and the rounding bound of computing it in the adapter dtype
    and casting it to ``out_dtype``."""
    a, b, bb = lora_tensors(tensors)
    dt = tensors["lora_A.weight"].dtype
    u = qbounds.unit_roundoff(dt)
    xv = x.detach().double().cpu()
    x_abs = xv.abs()
    h = xv @ a.t()
    mag_h = x_abs @ a.abs().t()
    e_h = cast_error(x.dtype, dt) * mag_h + gamma_n(a.shape[1], dt) * mag_h * (1 + cast_error(x.dtype, dt))
    z = h @ b.t() + (bb if bb is not None else 0.0)
    bb_abs = 0.0 if bb is None else bb.abs()
    mag_z = (mag_h + e_h) @ b.abs().t() + bb_abs
    e_z = e_h @ b.abs().t() + gamma_n(b.shape[1] + 1, dt) * mag_z
    s = abs(scaling)
    e_s = s * e_z + u * s * (mag_z + e_z)
    mag_s = s * (mag_z + e_z) + e_s
    e_s = e_s + cast_error(dt, out_dtype) * mag_s
    return Expected(scaling * z, e_s)


def lora_expected(
    layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor, *, training: bool | None = None
) -> Expected:
    """Expected ``base(x) + scaling*(B(Ax) + b_B)`` of an implementation's LoRA layer (unmerged)."""
    tensors = layer.adapter_parameters(name)
    y0 = base_expected(layer.base_layer, x, training=training)
    path = lora_path(tensors, lora_scaling(params), x, x.dtype)
    add = qbounds.unit_roundoff(x.dtype) * (y0.value.abs() + y0.bound + path.value.abs() + path.bound)
    return Expected(y0.value + path.value, y0.bound + path.bound + add)


# -- OFT -------------------------------------------------------------------------------------

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
