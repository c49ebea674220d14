"""Cases of area ``moves``: the casts and the bases they are applied to."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from conformance.clauses import cases

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: the casts users make on a whole module, with the dtype they give floating tensors
CASTS: dict[str, tuple[Callable[[nn.Module], nn.Module], torch.dtype]] = {
    "to(torch.float16)": (lambda m: m.to(torch.float16), torch.float16),
    "half()": (lambda m: m.half(), torch.float16),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "float()": (lambda m: m.float(), torch.float32),
}

#: words a refusal names the quantized layer or its storage with
REFUSAL_WORDS = ("quant", "storage", "4bit", "4-bit", "8bit", "8-bit", "int8", "bitsandbytes", "Params4bit",
                 "Int8Params", "Linear4bit", "Linear8bitLt", "packed")


def move_cases(ctx: CheckContext, bits: int) -> list[cases.BaseCase]:
    """The base-layer matrix (``cases.BASE_AXES``, every quant storage among them), every pair of values by default,
    the full product in the slow tier (``CheckContext.base_matrix``)."""
    return ctx.base_matrix(bits)
