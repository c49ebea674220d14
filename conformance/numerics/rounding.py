"""Unit roundoffs, casts and the rounding of bitsandbytes' int8 dequantization (one place for each constant)."""

from __future__ import annotations

import torch

from conformance.quant import bounds as qbounds
from conformance.quant.layers import weight_dtype_of

U64 = qbounds.unit_roundoff(torch.float64)
U32 = qbounds.unit_roundoff(torch.float32)
U16 = qbounds.unit_roundoff(torch.float16)

# bitsandbytes backends/default/ops.py int8_mm_dequant multiplies by 6.200124e-05 instead of 1/127**2
INT8_DEQUANT_SCALE_ERROR = abs(float(torch.tensor(6.200124e-05, dtype=torch.float32)) * 127**2 - 1)

INT8_DEQUANT_ROUNDINGS = 3
"""float32 roundings of ``A_i32 * (row_stats * col_stats) * 6.200124e-05`` (bitsandbytes 0.50
``int8_mm_dequant``): ``row * col`` (1), the product with the int32 accumulator (2), the product with
the constant (3). The int32 -> float32 conversion of the accumulator is exact while ``|A| < 2**24``,
i.e. for ``in_features * 127**2 < 2**24`` (in_features <= 1040; every case here has <= 96)."""

INT8_DEQUANT_ERROR = (1 + U32) ** INT8_DEQUANT_ROUNDINGS * (1 + INT8_DEQUANT_SCALE_ERROR) - 1
"""Relative error of the int8 dequantization: three float32 roundings and the constant's offset,
multiplied out exactly (first order ``3 u32 + 1.8e-5``; the product is the derived form of the
``* 1.0001`` slack the oracle used to carry on top of that first-order sum)."""

_CONTAINS = {
    torch.float64: {torch.float64, torch.float32, torch.float16, torch.bfloat16},
    torch.float32: {torch.float32, torch.float16, torch.bfloat16},
    torch.float16: {torch.float16},
    torch.bfloat16: {torch.bfloat16},
}


def cast_error(src: torch.dtype, dst: torch.dtype) -> float:
    """Relative error of casting a ``src`` value to ``dst`` (0 when ``dst`` holds every ``src`` value)."""
    return 0.0 if src in _CONTAINS.get(dst, {dst}) else qbounds.unit_roundoff(dst)


def gamma_n(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n`` in ``dtype`` (``n`` at least 1: a length-0 sum still rounds once)."""
    return qbounds.gamma(max(n, 1), qbounds.unit_roundoff(dtype))


def storage_rounding(base: object) -> float:
    """Relative distance between the weight a 4-bit kernel multiplies with and ``dequantize``'s, from the
    storage dtype (``quant_state.dtype``, the checkpoint's ``torch_dtype``).

    ``dequantize_4bit`` returns ``absmax * code`` rounded to ``quant_state.dtype``; bitsandbytes 0.50.2's
    fused kernels (CPU ``gemm_4bit``, taken without grad) dequantize straight to the input dtype instead,
    so the float32 product may or may not be rounded to the storage dtype: ``|W_kernel - W_stored| <=
    u_s / (1 - u_s) |W_stored|``. 0 for float32 storage and for 8-bit layers (their CB * SCB is float32).
    """
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    if qs is None:
        return 0.0
    dtype = weight_dtype_of(base)  # a repacked layer keeps its storage dtype as quant_state.original_dtype
    if dtype == torch.float32:
        return 0.0
    u = qbounds.unit_roundoff(dtype)
    return u / (1 - u)
