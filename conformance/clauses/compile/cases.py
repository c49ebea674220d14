"""Cases of area ``compile``: the torch.compile backend per device (the one place it is chosen) and the bases the
compiled layers sit on (a few: compiling on a CPU takes a second or so per layer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conformance.clauses import cases
from conformance.core import upstream

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext
    from conformance.core.upstream import KnownFailure

#: the torch.compile backend per device: ``aot_eager`` on the CPU (dynamo's capture and AOTAutograd's functional
#: graph, run by eager kernels: no C++ toolchain needed), ``inductor`` (the default backend) on CUDA
BACKENDS = {"cpu": "aot_eager", "cuda": "inductor"}

#: leading dims of the inputs, alternated over the cases (no 1-D input: bitsandbytes 0.50's 8-bit eval matmul
#: rejects it, see FWD-ORACLE)
INPUT_LEADS = ((3,), (2, 3))


def backend_for(device: str | torch.device) -> str:
    """The torch.compile backend the compile clauses use on ``device`` (``BACKENDS``)."""
    kind = torch.device(device).type
    if kind not in BACKENDS:
        raise ValueError(f"no torch.compile backend chosen for device {kind!r}: add it to BACKENDS in {__name__}")
    return BACKENDS[kind]


def compile_cases(ctx: CheckContext, bits: int, *, merges: bool = False) -> list[cases.BaseCase]:
    """The base-layer matrix (``cases.BASE_AXES``) in the standard layout (the CPU packed layout pinned off), each
    value once by default and every pair in the slow tier (``CheckContext.base_matrix(costly=True)``: compiling on
    a CPU takes a second or so per layer); ``merges``: bases a CPU requantization gets right."""
    return ctx.base_matrix(bits, merges=merges, pinned={"cpu_packed": False} if bits == 4 else None, costly=True)


def compile_known(ctx: CheckContext, case: cases.BaseCase) -> KnownFailure | None:
    """The listed bitsandbytes failure a compiled forward over ``case`` may meet here: on CUDA (inductor), a base whose
    forward casts its bias to the input's dtype by assigning ``bias.data`` (4-bit: a bias stored in another dtype than
    the compute dtype; 8-bit: the same with ``has_fp16_weights``), ``upstream.COMPILE_BIAS_CAST``; None elsewhere
    (the aot_eager backend on the CPU computes it right)."""
    if torch.device(ctx.device).type != "cuda" or not case.bias:
        return None
    if case.bias_dtype != case.compute_dtype and (case.bits == 4 or case.has_fp16_weights):
        return ctx.known_upstream(upstream.COMPILE_BIAS_CAST)
    return None
