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
    the full product in the slow tier (``CheckContext.base_matrix``). 8-bit ``has_fp16_weights`` is held False: such
    a base has no quantized payload, its weight is a float16 tensor a cast changes like any other (the clause's
    bit-for-bit premise does not apply)."""
    return ctx.base_matrix(bits, pinned={"has_fp16_weights": False} if bits == 8 else None)


# -- device moves (MOVE-DEVICE) ----------------------------------------------------------------

Move = Callable[[nn.Module], nn.Module]

#: the moves users make from the CPU to CUDA, as they write them (``Module.to`` hands each parameter to
#: ``Params4bit.to``; ``Module.cuda`` to ``Params4bit.cuda``, which turns a CPU-packed weight back first)
TO_CUDA: dict[str, Move] = {
    "to('cuda')": lambda m: m.to("cuda"),
    "cuda()": lambda m: m.cuda(),
    "to(torch.device('cuda', 0))": lambda m: m.to(torch.device("cuda", 0)),
}
#: the moves back from CUDA (each CUDA move above is followed by one of them, alternating)
BACK_TO_CPU: dict[str, Move] = {
    "cpu()": lambda m: m.cpu(),
    "to('cpu')": lambda m: m.to("cpu"),
}
#: the CPU round trip that runs everywhere: a CPU layer moved to the CPU goes through ``Params4bit.to``/``_apply``
TO_CPU: dict[str, Move] = {
    **BACK_TO_CPU,
    "to(torch.device('cpu'))": lambda m: m.to(torch.device("cpu")),
}

#: bitsandbytes 0.50.2 keeps its CPU packed layout off in a process that loaded its CUDA library (its
#: ``has_avx512bf16`` answers False there, measured on the H200 host, whose CPU has AVX512-BF16): a CPU-packed layer
#: never meets a CUDA move in one process, so MOVE-DEVICE's packed bases run the CPU round trip only. That
#: ``Params4bit.cuda`` would turn such a layer back lossily is shown by xfails/bitsandbytes/cpu_packed_cuda_inverse.py
#: (a repack forced by hand), not listed.


def device_move_cases(bits: int) -> list[cases.BaseCase]:
    """The bases MOVE-DEVICE moves. 4-bit: NF4/FP4, double quant on/off and quant storage uint8 and each float
    (alternating, compute dtypes alternating), then two bases with bitsandbytes' CPU packed layout on, of a shape
    it repacks with two blocks per row (``BaseCase.unavailable`` skips them where the layout does not exist).
    8-bit: outlier threshold 0 and ``cases.INT8_THRESHOLD`` (their inputs get ``cases.with_outliers``), and a
    ``has_fp16_weights`` base (a float16 weight that a device move must keep as it is)."""
    if bits == 8:
        return [cases.BaseCase(8, compute_dtype=torch.float32),
                cases.BaseCase(8, compute_dtype=torch.bfloat16),
                cases.BaseCase(8, *cases.ORIENTATION_SHAPES[1], compute_dtype=torch.float16,
                               threshold=cases.INT8_THRESHOLD),
                cases.BaseCase(8, compute_dtype=torch.float32, threshold=cases.INT8_THRESHOLD),
                cases.BaseCase(8, *cases.ORIENTATION_SHAPES[1], compute_dtype=torch.bfloat16, has_fp16_weights=True)]
    combos = ((cases.QUANT_TYPES[0], False), (cases.QUANT_TYPES[1], True), (cases.QUANT_TYPES[0], True),
              (cases.QUANT_TYPES[1], False))
    out = [cases.BaseCase(4, quant_type=qt, double_quant=dq, compute_dtype=cases.COMPUTE_DTYPES[i % 3],
                          quant_storage=None if qs == torch.uint8 else qs)
           for i, (qs, (qt, dq)) in enumerate(zip(cases.QUANT_STORAGES, combos))]
    out += [cases.BaseCase(4, 128, 64, quant_type=cases.QUANT_TYPES[0], double_quant=False,
                           compute_dtype=torch.float32, cpu_packed=True),
            cases.BaseCase(4, 128, 64, quant_type=cases.QUANT_TYPES[1], double_quant=True,
                           compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16, cpu_packed=True)]
    return out
