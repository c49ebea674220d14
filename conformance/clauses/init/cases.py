"""The init area's cases: the base axes an initialization meets, the spec it is asked for, and the inputs.

``BASES[bits]`` are ``InitCase``: a ``cases.BaseCase`` and whether the base ran an eval-mode no-grad forward before
the adapter was made (``warm``: what a user's model did when it was evaluated first; on a CPU with AVX512-BF16 that
forward repacks a 4-bit base into bitsandbytes' CPU packed layout, ``cpu_packed``). The 4-bit axes: each
``quant_storage`` (uint8, bfloat16 as FSDP-QLoRA loads, float16, float32), a blocksize other than bitsandbytes'
default 64, FP4 with double quant, a bfloat16 checkpoint (``weight_dtype``: the dtype bitsandbytes quantized from).
The 8-bit axes: int8 storage, the outlier threshold 6.0 transformers loads with, float16 weights. Every 4-bit base
has in_features a multiple of its blocksize (``cases.base_invalid(merges=True)``: bitsandbytes 0.50.2's CPU
dequantize), as a residual is written like a merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from conformance.clauses import cases
from conformance.core.inits import LOFTQ_WEIGHT, TABLE, Init

#: rank and alpha of every case: scaling alpha / r = 2, so an initialization that forgets the scaling shows
R, ALPHA = 4, 8
INPUT_ROWS = 3


@dataclass(frozen=True)
class InitCase:
    base: cases.BaseCase
    #: the base ran an eval-mode no-grad forward before the adapter was made
    warm: bool = False

    @property
    def label(self) -> str:
        return self.base.label + ("-after-eval-forward" if self.warm else "")


BASES: dict[int, tuple[InitCase, ...]] = {
    4: (InitCase(cases.BaseCase(4)),
        InitCase(cases.BaseCase(4, quant_storage=torch.bfloat16)),
        InitCase(cases.BaseCase(4, quant_storage=torch.float16, blocksize=32, compute_dtype=torch.bfloat16)),
        InitCase(cases.BaseCase(4, quant_storage=torch.float32)),
        InitCase(cases.BaseCase(4, in_features=128, out_features=64, quant_type="fp4", double_quant=True,
                                blocksize=128)),
        InitCase(cases.BaseCase(4, weight_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)),
        InitCase(cases.BaseCase(4), warm=True),
        InitCase(cases.BaseCase(4, in_features=64, out_features=64, cpu_packed=True), warm=True)),
    8: (InitCase(cases.BaseCase(8)),
        InitCase(cases.BaseCase(8, in_features=64, out_features=64, threshold=6.0), warm=True),
        InitCase(cases.BaseCase(8, has_fp16_weights=True)),
        InitCase(cases.BaseCase(8, has_fp16_weights=True), warm=True)),
}


def params(init: Init, loftq_weight: torch.Tensor | None = None) -> dict[str, Any]:
    """The spec's parameters for ``init`` (LoftQ carries the float weight)."""
    p: dict[str, Any] = {"r": R, "lora_alpha": ALPHA, "init_lora_weights": TABLE[init].value}
    if init is Init.LOFTQ:
        p[LOFTQ_WEIGHT] = loftq_weight
    return p


def float_weight(case: InitCase, gen: torch.Generator) -> torch.Tensor:
    """The float weight the base is quantized from (what LoftQ reads back), scaled like ``make_base_layer``'s."""
    b = case.base
    return torch.randn(b.out_features, b.in_features, generator=gen) / math.sqrt(b.in_features)


def inputs(case: InitCase, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the base's compute dtype, with outlier columns where the 8-bit base has a threshold."""
    x = x.to(case.base.compute_dtype)
    return cases.with_outliers(x, case.base.threshold) if case.base.threshold else x
