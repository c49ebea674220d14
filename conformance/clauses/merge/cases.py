"""The merge area's own cases: the drawn (method, bits, base, params) case of the hypothesis properties, its label,
seed and layer, and the bases of the lora_bias and quantization-settings clauses (shared records:
``conformance.clauses.cases``)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import strategies as st

from conformance.clauses import cases, strategies
from conformance.core import upstream

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext
    from conformance.core.upstream import KnownFailure


#: the merge properties whose drawn bases also take the quant storage and 8-bit threshold axes (the opt-in draws of
#: ``strategies.base_cases``); the others draw what they drew before. Their inputs are plain normal draws (the
#: property's text is hypothesis' derandomized seed): a threshold case checks that the merge keeps the threshold and
#: the forward around it, not the outlier path
DRAWS_EVERY_AXIS = frozenset({"MERGE-FORWARD-BOUND"})


def _draw_case(ctx: CheckContext, data: st.DataObject) -> tuple[str, int, cases.BaseCase, dict[str, Any]]:
    pairs = list(ctx.cases())
    method, bits = data.draw(st.sampled_from(pairs), label="method, bits")
    axes: dict[str, Any] = {}
    if ctx.clause.id in DRAWS_EVERY_AXIS:
        axes = {"quant_storages": strategies.base_axis_values(4, "quant_storage"),
                "thresholds": strategies.base_axis_values(8, "threshold")}
    case = data.draw(strategies.base_cases(bits, cpu_safe=ctx.device == "cpu", storage_dtypes=(None, *cases.STORAGE_DTYPES),
                                           **axes), label="base")
    params = data.draw(strategies.adapter_params(method, case.in_features), label="adapter")
    return method, bits, case, params


def _label(method: str, case: cases.BaseCase, params: dict[str, Any]) -> str:
    return f"{cases.AdapterCase(method, params).label} on {case.label}"


def _seed(label: str) -> int:
    return zlib.crc32(label.encode())


def _build(ctx: CheckContext, method: str, case: cases.BaseCase, params: dict[str, Any], name: str = "default",
           seed: int = 0) -> torch.nn.Module:
    base = ctx.make_base(case, seed=ctx.seed + seed % 1000)
    layer = ctx.make_layer(base, method, adapter_name=name, **params)
    cases.fill_adapter(layer, name, ctx.generator(seed))
    return layer


def _bias_cases(bits: int) -> list[cases.BaseCase]:
    """MERGE-LORA-BIAS bases: compute dtypes, a bfloat16-stored base (its bias is bfloat16), square and not."""
    if bits == 4:
        return [cases.BaseCase(4, compute_dtype=torch.float32), cases.BaseCase(4, compute_dtype=torch.float16),
                cases.BaseCase(4, *cases.ORIENTATION_SHAPES[1], weight_dtype=torch.bfloat16)]
    return [cases.BaseCase(8), cases.BaseCase(8, *cases.ORIENTATION_SHAPES[1], weight_dtype=torch.bfloat16)]


def _settings_cases(ctx: CheckContext, bits: int) -> list[cases.BaseCase]:
    """MERGE-KEEPS-QUANT-SETTINGS bases: the base-layer matrix (``cases.BASE_AXES``: every setting that defines a
    base, compute and storage dtypes, float quant storages, the CPU packed layout, the 8-bit outlier threshold), every
    pair of values by default, the full product in the slow tier (``CheckContext.base_matrix``). Every blocksize
    takes part: the clause compares settings, not weights (``cases.base_invalid``'s merge rule is not needed)."""
    return ctx.base_matrix(bits)


def _forward_bound_cases(bits: int) -> list[cases.BaseCase]:
    """MERGE-FORWARD-BOUND's listed bases, run after its hypothesis property (whose strategy draws none of them): the
    8-bit bases with ``has_fp16_weights`` (``cases.fp16_weight_cases``), each in train and eval mode."""
    return cases.fp16_weight_cases(bits)


def merge_known(ctx: CheckContext, case: cases.BaseCase) -> KnownFailure | None:
    """The listed bitsandbytes failure a merge on ``case`` may meet here: an 8-bit base keeping a float16 weight, on
    CUDA, where a merge that builds its new ``Int8Params`` on the CPU and moves it gets a plain tensor back
    (``upstream.INT8_FP16_WEIGHTS_TO_DEVICE``); None elsewhere."""
    if case.bits == 8 and case.has_fp16_weights and torch.device(ctx.device).type == "cuda":
        return ctx.known_upstream(upstream.INT8_FP16_WEIGHTS_TO_DEVICE)
    return None
