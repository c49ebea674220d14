"""Cases of area ``moves``: the casts and the bases they are applied to."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from conformance.clauses import cases

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


def move_cases(bits: int) -> list[cases.BaseCase]:
    """4-bit: one base per quant storage (quant types and compute dtypes alternating); 8-bit: one per compute dtype."""
    if bits == 8:
        return [cases.BaseCase(8, compute_dtype=d) for d in cases.COMPUTE_DTYPES]
    return [cases.BaseCase(4, quant_type=cases.QUANT_TYPES[i % 2], compute_dtype=cases.COMPUTE_DTYPES[i % 3],
                           quant_storage=None if qs == torch.uint8 else qs)
            for i, qs in enumerate(cases.QUANT_STORAGES)]
