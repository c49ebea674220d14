"""Cases of area ``compile``: the torch.compile backend per device (the one place it is chosen) and the bases the
compiled layers sit on (a few: compiling on a CPU takes a second or so per layer)."""

from __future__ import annotations

import torch

from conformance.clauses import cases

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


def compile_cases(bits: int) -> list[cases.BaseCase]:
    """4-bit: NF4 without double quant in fp32, FP4 with double quant in bf16, a square NF4 double-quant base in
    bf16; 8-bit: fp32 and bf16. All in the standard layout (the CPU packed layout off)."""
    if bits == 4:
        return [cases.BaseCase(4, quant_type="nf4", compute_dtype=torch.float32),
                cases.BaseCase(4, quant_type="fp4", double_quant=True, compute_dtype=torch.bfloat16),
                cases.BaseCase(4, *cases.ORIENTATION_SHAPES[1], quant_type="nf4", double_quant=True,
                               compute_dtype=torch.bfloat16)]
    return [cases.BaseCase(8, compute_dtype=torch.float32), cases.BaseCase(8, compute_dtype=torch.bfloat16)]
