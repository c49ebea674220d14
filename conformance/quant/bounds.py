"""Analytic error bounds derived from a layer's quantization state.

No tolerance in this project is a magic number: each one is computed here from what the
quantized layer stores (codebook, block absmax, double-quant state, row statistics) and from
the unit roundoff of the floating-point formats involved.

4-bit (NF4/FP4, blockwise; bitsandbytes ``quantize_4bit``): a block of ``blocksize`` weights is
scaled by its absmax ``a`` and each value rounded to the nearest of 16 codes in [-1, 1]. With ``g``
the largest gap between adjacent codes, ``|w - a*c| <= a*g/2``. Double quant stores ``a`` itself
8-bit blockwise (blocks of 256 absmaxes, dynamic code, offset = mean), so dequantization uses
``a'`` with ``|a - a'| <= e_a = absmax2 * g2/2``; then ``|w - a'*c| <= a*g/2 + |a-a'|*|c|
<= (a' + e_a)*g/2 + e_a``. Casting to and from the weight dtype adds ``(a' + e_a)*u`` twice.

8-bit (LLM.int8 row-wise, ``int8_vectorwise_quant``): a row is scaled by its absmax ``s`` to
[-127, 127] and rounded, so ``|w - q*s/127| <= s/254``, plus the fp16 cast of the input
(``s*u16``) and the float32 dequantize (``s*u32``).

8-bit with ``has_fp16_weights`` (bitsandbytes' default, LitGPT's int8 training mode): the layer stores
``W16 = fl16(W)`` and every forward that needs the int8 form quantizes it with the same
``int8_vectorwise_quant(W16)`` (``MatMul8bitFp`` in training mode on the CPU, ``MatMul8bitLt`` otherwise;
bitsandbytes 0.50.2 ``autograd/_functions.py``). The chain is the same as above, only the moment differs: the
float16 rounding ``|W16 - W| <= u16 |W16| <= u16 s`` (Higham (2.5): ``fl(w) = w / (1 + d)``, ``|d| <= u``)
happens when the weight is stored (built, or merged: ``requantize`` stores the float32 merged weight as float16;
below float16's normal range, 2**-14, that rounding is absolute instead, at most ``FP16_SUBNORMAL_ERROR``, which
both 8-bit kinds add),
the row quantization ``s/254`` with ``s`` the row absmax of ``W16`` (what ``SCB`` is, exact in float32) and the
float32 dequantize ``2 s u32`` at the forward. So ``weight_bound`` is the same expression with ``s`` computed
from the float16 weight by bitsandbytes' own quantizer (``layers.int8_of``), never read from the state's cache.

A layer output ``y = x W^T`` then errs by at most ``sum_k bound_jk |x_k|`` (triangle inequality).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from .layers import (
    BaseLayerError,
    bits_of,
    dequantize,
    double_quant_of,
    has_fp16_weights,
    is_cpu_packed,
    require_quantized,
    scb_of,
    standard_layout,
    weight_dtype_of,
)

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


#: relative distance of a block's absmax after bitsandbytes' CPU repack from the one it was quantized with: the repack
#: (bitsandbytes 0.50.2 ``functional._convert_weight_packed_for_cpu``) rounds it to bfloat16, so ``|a - a'| <=
#: u_bf16 |a'| / (1 - u_bf16)`` relative to the rounded ``a'``
CPU_REPACK_ABSMAX_ERROR = UNIT_ROUNDOFF[torch.bfloat16] / (1 - UNIT_ROUNDOFF[torch.bfloat16])


#: half the spacing of float16's subnormals (2**-24): the absolute error of rounding a value below float16's smallest
#: normal (2**-14) to float16, where the relative ``u16`` model does not hold; a row whose absmax is that small (a
#: weight row of order 1e-5) rounds by up to this per element whatever its scale
FP16_SUBNORMAL_ERROR = 2.0**-25


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the relative error of one rounding to ``dtype``."""
    try:
        return UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise ValueError(f"no unit roundoff known for {dtype}; use one of {sorted(map(str, UNIT_ROUNDOFF))}") from None


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): the relative error bound of an n-term dot product."""
    nu = n * u
    if nu >= 1:
        raise ValueError(f"gamma undefined for n={n}, u={u}: n*u >= 1")
    return nu / (1 - nu)


def max_code_gap(code: torch.Tensor) -> float:
    """Largest distance between adjacent values of a quantization codebook."""
    c = torch.sort(code.double().flatten().unique()).values
    return float((c[1:] - c[:-1]).max())


def absmax_4bit(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a', e_a): the per-block absmax dequantization uses, and its double-quant error bound.

    A layer bitsandbytes repacked for the CPU (``layers.is_cpu_packed``) multiplies by its absmax rounded to
    bfloat16 (``_convert_weight_packed_for_cpu``): ``a'`` is that, in the standard block order, and
    ``e_a = a' CPU_REPACK_ABSMAX_ERROR`` bounds its distance from the float32 absmax it was quantized with. The
    repack of a double-quantized layer drops ``state2``, and with it what bounds the double-quant error: no
    bound is derivable then (``BaseLayerError``)."""
    qs = layer.weight.quant_state
    if is_cpu_packed(layer):
        if double_quant_of(layer):
            raise BaseLayerError("no weight bound for a double-quantized layer bitsandbytes repacked for the CPU: "
                                 "the repack dropped the double-quant statistics (quant_state.state2); "
                                 "read the bound before its first eval-mode forward")
        a = qs.absmax.double().cpu().t().reshape(-1)
        return a, a.abs() * CPU_REPACK_ABSMAX_ERROR
    if qs.nested:
        a = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2).double().cpu() + float(qs.offset)
        g2 = max_code_gap(qs.state2.code)
        per_chunk = qs.state2.absmax.double().cpu() * g2 / 2
        e = per_chunk.repeat_interleave(qs.state2.blocksize)[: a.numel()]
        # float32 storage of the dequantized absmax and the offset add: two roundings
        e = e + a.abs() * 2 * UNIT_ROUNDOFF[torch.float32]
        return a, e
    a = qs.absmax.double().cpu()
    return a, torch.zeros_like(a)


def weight_bound(layer: nn.Module) -> torch.Tensor:
    """Per-element bound on |W_stored - W_exact| (float64, shape out x in) for a quantized layer.

    ``W_exact`` is the float weight that was handed to bitsandbytes; ``W_stored`` what
    ``conformance.quant.dequantize`` returns. An 8-bit layer with ``has_fp16_weights``: ``W_stored`` is its float16
    weight quantized and dequantized row-wise as its forward does, ``s`` that weight's row absmax (the module
    docstring's derivation: the float16 storage rounding and the int8 rounding of the same row, in that order). Always on the CPU, like every bound here: float64
    oracle arithmetic happens there whatever device the layer is on.
    """
    require_quantized(layer)
    if bits_of(layer) == 4:
        qs = layer.weight.quant_state
        a, e_a = absmax_4bit(layer)
        g = max_code_gap(qs.code)
        u = unit_roundoff(weight_dtype_of(layer))
        amax = a.abs() + e_a
        per_block = amax * g / 2 + e_a + 2 * amax * u
        out, inn = qs.shape
        flat = per_block.repeat_interleave(qs.blocksize)[: out * inn]
        return flat.reshape(out, inn).cpu()
    s = scb_of(layer).double().cpu()
    # the float16 rounding: u16 s for normal values, FP16_SUBNORMAL_ERROR below float16's normal range
    per_row = s / 254 + s * (UNIT_ROUNDOFF[torch.float16] + 2 * UNIT_ROUNDOFF[torch.float32]) + FP16_SUBNORMAL_ERROR
    return per_row[:, None].expand(layer.out_features, layer.in_features).clone()


def fp16_master_gap(layer: nn.Module) -> torch.Tensor:
    """``|W16 - dequantize(layer)|`` elementwise (float64, CPU) for an 8-bit layer with ``has_fp16_weights``; zeros
    for every other layer.

    Such a layer holds two weights a merge may add its delta to: the float16 weight it stores (the master copy,
    what ``W += delta`` on the parameter does: LitGPT's ``LoRALinear.merge``) and the int8 form its forward multiplies
    by (``dequantize``, what dequantize -> modify -> requantize starts from). Both are merges of the same base; they
    differ by this gap, computed exactly from the state before the merge (not a bound), which a merge bound adds once.
    """
    require_quantized(layer)
    if not has_fp16_weights(layer):
        return torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    w16 = layer.weight.data.detach().to(torch.float16).double().cpu()
    return (w16 - dequantize(layer).double().cpu()).abs()


def output_bound(elem_bound: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bound on |y - y_exact| for y = x W^T when each W_jk errs by at most elem_bound_jk.

    ``sum_k bound_jk |x_k|``, for inputs of any leading shape.
    """
    return x.detach().double().cpu().abs() @ elem_bound.double().cpu().t()


def matmul_rounding_bound(
    x: torch.Tensor, w_abs: torch.Tensor, compute_dtype: torch.dtype, out_abs: torch.Tensor | None = None
) -> torch.Tensor:
    """Bound on the floating-point error of ``x W^T`` evaluated in ``compute_dtype``.

    Model (documented, not fitted): W is rounded once to ``compute_dtype`` (relative u_c), the dot
    products accumulate in at least float32 (gamma_n with u_32 for half types, gamma_n with u_c for
    float32 and float64), and the result is rounded once to ``compute_dtype`` (u_c * |y|).
    """
    u_c = unit_roundoff(compute_dtype)
    n = w_abs.shape[-1]
    u_acc = min(u_c, UNIT_ROUNDOFF[torch.float32])
    mag = x.detach().double().cpu().abs() @ w_abs.double().cpu().t()
    bound = (u_c + gamma(n, u_acc)) * mag
    if out_abs is not None:
        bound = bound + u_c * out_abs.double().cpu()
    else:
        bound = bound + u_c * mag
    return bound


def cpu_repack_bound(layer: nn.Module) -> torch.Tensor:
    """Bound on how far bitsandbytes' CPU repack moved the dequantized weights of ``layer`` (a repacked 4-bit layer).

    The repack (bitsandbytes 0.50.2 ``functional._convert_weight_packed_for_cpu``) keeps the 4-bit codes ``c`` and
    rounds each block's absmax ``a`` (float32; a double-quantized one dequantized first) to bfloat16: ``a' = bf16(a)``,
    ``|a - a'| <= e = CPU_REPACK_ABSMAX_ERROR |a'|``. A weight dequantizes to ``c a`` rounded to float32 and then to
    the storage dtype (relative error at most ``k = (1 + u32)(1 + u_s) - 1``, ``u_s`` 0 for float32 storage), so
    ``|W' - W| <= |c| e + k |c| (|a| + |a'|) <= cmax (e + k (2 |a'| + e))`` with ``cmax`` the code's largest
    magnitude (``quant_state.code``). ``a'`` is what the layer stores now (``layers.standard_layout``)."""
    _, state = standard_layout(layer)
    a = state.absmax.double().cpu().abs()
    e = a * CPU_REPACK_ABSMAX_ERROR
    dtype = weight_dtype_of(layer)
    us = 0.0 if dtype == torch.float32 else unit_roundoff(dtype)
    k = (1 + UNIT_ROUNDOFF[torch.float32]) * (1 + us) - 1
    cmax = float(state.code.double().abs().max())
    per_block = cmax * (e + k * (2 * a + e))
    out, inn = state.shape
    return per_block.repeat_interleave(state.blocksize)[: out * inn].reshape(out, inn)
