"""Hypothesis strategies over the case matrices of ``conformance.clauses.cases`` (one source of truth).

Widening a list in ``cases`` widens every property test and every hypothesis-driven clause.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from hypothesis import strategies as st

from conformance.core.vocabulary import LORA_LIKE

from . import cases

WEIGHT_DTYPES = cases.WEIGHT_DTYPES


def cpu_blocksize_ok(in_features: int, blocksize: int) -> bool:
    """bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` kernel (``cdequantize_blockwise_cpu_*``) takes
    (rows, in_features) and is only right when blocks do not straddle rows: ``in_features % blocksize
    == 0``; otherwise it returns scrambled weights (the layer forward uses the same kernel, so it is
    self-consistent, but every merge re-scrambles). Cases that compare weights against the float
    weight or requantize keep to valid pairs (see suites/test_quant_bounds.py)."""
    return in_features % blocksize == 0


@st.composite
def base_cases(
    draw: st.DrawFn, bits: int | None = None, *, dtypes: tuple[torch.dtype, ...] = cases.COMPUTE_DTYPES,
    shapes: tuple[tuple[int, int], ...] = cases.SHAPES, cpu_safe: bool = True,
    storage_dtypes: tuple[torch.dtype | None, ...] = (None,),
    quant_storages: tuple[torch.dtype | None, ...] = (None,), thresholds: tuple[float, ...] = (0.0,),
) -> cases.BaseCase:
    """A quantized base layer description: bits, shape, quant type, blocksize, double quant, compute dtype,
    and the storage dtype (``BaseCase.weight_dtype``) drawn from ``storage_dtypes`` (default: today's float32).

    ``cpu_safe`` keeps 4-bit cases to ``in_features % blocksize == 0`` (``cpu_blocksize_ok``). Opt-in axes, each
    drawn only when given more than one value (so a caller that leaves them draws exactly what it drew before):
    ``quant_storages`` (4-bit ``BaseCase.quant_storage``; None: uint8) and ``thresholds`` (8-bit
    ``BaseCase.threshold``; a case at a threshold above 0 needs inputs with outlier columns to take the outlier
    path: ``cases.with_outliers``). The values come from ``cases.BASE_AXES`` (``base_axis_values``).
    """
    b = draw(st.sampled_from((4, 8))) if bits is None else bits
    if b == 4 and cpu_safe:
        shapes = tuple(s for s in shapes if any(cpu_blocksize_ok(s[0], bs) for bs in cases.BLOCKSIZES))
    i, o = draw(st.sampled_from(shapes))
    dt = draw(st.sampled_from(dtypes))
    wd = draw(st.sampled_from(storage_dtypes)) if len(storage_dtypes) > 1 else storage_dtypes[0]
    if b == 8:
        th = draw(st.sampled_from(thresholds)) if len(thresholds) > 1 else thresholds[0]
        return cases.BaseCase(8, i, o, compute_dtype=dt, weight_dtype=wd, threshold=th)
    case = cases.BaseCase(
        4, i, o, quant_type=draw(st.sampled_from(cases.QUANT_TYPES)),
        blocksize=draw(st.sampled_from([bs for bs in cases.BLOCKSIZES if not cpu_safe or cpu_blocksize_ok(i, bs)])),
        double_quant=draw(st.booleans()), compute_dtype=dt, weight_dtype=wd,
    )
    if len(quant_storages) > 1:
        case = replace(case, quant_storage=draw(st.sampled_from(quant_storages)))
    elif quant_storages[0] is not None:
        case = replace(case, quant_storage=quant_storages[0])
    return case


def base_axis_values(bits: int, name: str) -> tuple[Any, ...]:
    """The values of axis ``name`` of ``cases.BASE_AXES[bits]`` (what the opt-in draws of ``base_cases`` take)."""
    for axis in cases.BASE_AXES[bits]:
        if axis.name == name:
            return axis.values
    raise ValueError(f"no {bits}-bit axis {name!r}; the axes are {[a.name for a in cases.BASE_AXES[bits]]}")


@st.composite
def lora_params(draw: st.DrawFn, *, lora_bias: bool | None = False) -> dict[str, Any]:
    """Non-trivial LoRA parameters (random B) with alpha != r and rsLoRA drawn."""
    r = draw(st.sampled_from(cases.RANKS))
    alpha = draw(st.sampled_from([a for a in cases.ALPHAS if a != r]))
    params: dict[str, Any] = {"r": r, "lora_alpha": alpha, "init_lora_weights": False,
                              "use_rslora": draw(st.booleans())}
    if lora_bias is None:
        params["lora_bias"] = draw(st.booleans())
    elif lora_bias:
        params["lora_bias"] = True
    return params


@st.composite
def oft_params(draw: st.DrawFn, in_features: int) -> dict[str, Any]:
    """Non-identity OFT parameters with a block size from ``cases.OFT_BLOCK_SIZES`` dividing ``in_features``."""
    sizes = [b for b in cases.OFT_BLOCK_SIZES if in_features % b == 0]
    bs = draw(st.sampled_from(sizes))
    if draw(st.booleans()):
        return {"r": in_features // bs, "oft_block_size": 0, "init_weights": False}
    return {"r": 0, "oft_block_size": bs, "init_weights": False, "block_share": draw(st.booleans())}


def adapter_params(method: str, in_features: int) -> st.SearchStrategy[dict[str, Any]]:
    """``lora_params()`` (LoRA, DoRA: the same parameters, never ``lora_bias``) or ``oft_params(in_features)``."""
    if method in LORA_LIKE:
        return lora_params()
    if method == "oft":
        return oft_params(in_features)
    raise ValueError(f"unknown method {method!r}")
