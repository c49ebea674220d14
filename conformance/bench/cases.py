"""The benchmark matrix: shapes, token counts, dtypes, implementations and operations, in one place.

Everything the benchmarks measure is a :class:`BenchCase`. ``matrix(device, quick)`` lists them in
priority order (the runner stops at its time budget, so what matters most comes first):

1. 4-bit NF4 (+ double quant, the QLoRA recipe) LoRA r=16, bf16: every shape x every token count,
   forward and forward+backward, for the bare bnb layer, the measured floor, the reference (with
   and without the defensive clone), the reference's forward as first written (``reference-v0``)
   and PEFT;
2. the same in fp16;
3. merge / unmerge on 4-bit (reference and PEFT);
4. 8-bit (``Linear8bitLt``, threshold 0) LoRA, bf16;
5. OFT on 4-bit (reference and PEFT), 8-bit merge / unmerge.

Shapes are ``(in_features, out_features)`` and labelled ``"{in}x{out}"``: 4096x11008 is a LLaMA-7B
up-projection, 11008x4096 its down-projection, 8192x28672 a LLaMA-70B MLP projection. Base layers have
no bias (LLaMA) and store their weight in the compute dtype (as ``from_pretrained(torch_dtype=...)``
with a ``BitsAndBytesConfig`` leaves it). Adapters are held in the compute dtype too; B is random
(never time on zeros).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

GPU_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672))
GPU_TOKENS: tuple[int, ...] = (1, 512, 4096, 16384)  # 1 = decode, 16384 = a training micro-batch
GPU_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

QUICK_SHAPES: tuple[tuple[int, int], ...] = ((256, 256),)
QUICK_TOKENS: tuple[int, ...] = (8,)

RANK = 16
ALPHA = 16
OFT_BLOCK_SIZE = 32  # PEFT's OFTConfig default

#: Implementations: the bare bnb layer, the measured floors of the bare layer and of base + LoRA
#: (torch.matmul on dequantized weights plus the dequantize kernels), the reference (defensive clone on / off), the reference's original forward
#: (kept in conformance.bench.layers to show what the optimisation bought) and PEFT.
IMPLS_LORA = ("bnb", "floor-bare", "floor", "reference", "reference-noclone", "reference-v0", "reference-v0-noclone",
              "peft")
IMPLS_OFT = ("bnb", "reference", "peft")
OPS_RUN = ("fwd", "fwdbwd")
OPS_MERGE = ("merge", "unmerge")

#: Main shapes for the report table.
MAIN_SHAPES = ((4096, 4096), (8192, 28672))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@dataclass(frozen=True)
class BenchCase:
    """One timed measurement: an implementation running one operation on one layer shape."""

    impl: str  # one of IMPLS_LORA
    method: str  # lora | oft ("bnb" rows carry the method of their group, the layer has no adapter)
    bits: int
    in_features: int
    out_features: int
    tokens: int
    dtype: str
    op: str  # fwd | fwdbwd | merge | unmerge
    quant_type: str = "nf4"
    double_quant: bool = True
    rank: int = RANK
    alpha: int = ALPHA

    @property
    def shape(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    @property
    def group(self) -> str:
        """Everything but the implementation: rows of one group are compared with each other."""
        q = f"{self.quant_type}{'-dq' if self.double_quant else ''}" if self.bits == 4 else "int8"
        t = f"t{self.tokens}" if self.op in OPS_RUN else "t-"
        return f"{self.method}-{q}/{self.op}/{self.shape}/{t}/{self.dtype}"

    @property
    def key(self) -> str:
        """Stable identifier used by compare.py and as the pytest id."""
        return f"{self.group}/{self.impl}"

    def with_impl(self, impl: str) -> BenchCase:
        return replace(self, impl=impl)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(key=self.key, group=self.group, shape=self.shape)
        return d


def _run_cases(method: str, bits: int, impls: tuple[str, ...], shapes, tokens, dtypes, **kw: Any) -> list[BenchCase]:
    out = []  # grouped by base layer (dtype, shape) so the runner builds each base once
    for dtype in dtypes:
        for (i, o) in shapes:
            for op in OPS_RUN:
                for t in tokens:
                    for impl in impls:
                        out.append(BenchCase(impl, method, bits, i, o, t, dtype_name(dtype), op, **kw))
    return out


def _merge_cases(method: str, bits: int, impls: tuple[str, ...], shapes, dtype: torch.dtype, **kw: Any) -> list[BenchCase]:
    return [BenchCase(impl, method, bits, i, o, 0, dtype_name(dtype), op, **kw)
            for (i, o) in shapes for op in OPS_MERGE for impl in impls]


def matrix(device: str = "cuda", quick: bool = False) -> list[BenchCase]:
    """All cases in priority order. ``quick`` is the CPU smoke (tiny shapes, one token count)."""
    if quick:
        dt = (torch.bfloat16,) if device == "cuda" else (torch.float32,)
        shapes, tokens = QUICK_SHAPES, QUICK_TOKENS
        return (
            _run_cases("lora", 4, IMPLS_LORA, shapes, tokens, dt)
            + _run_cases("lora", 8, ("bnb", "floor-bare", "floor", "reference", "peft"), shapes, tokens, dt)
            + _run_cases("oft", 4, ("reference", "peft"), shapes, tokens, dt)
            + _merge_cases("lora", 4, ("reference", "peft"), shapes, dt[0])
        )
    bf16, fp16 = torch.bfloat16, torch.float16
    return (
        _run_cases("lora", 4, IMPLS_LORA, GPU_SHAPES, GPU_TOKENS, (bf16,))
        + _run_cases("lora", 4, ("bnb", "floor-bare", "floor", "reference", "reference-noclone", "peft"), GPU_SHAPES, GPU_TOKENS,
                     (fp16,))
        + _merge_cases("lora", 4, ("reference", "peft"), GPU_SHAPES, bf16)
        + _run_cases("lora", 8, ("bnb", "floor-bare", "floor", "reference", "peft"), GPU_SHAPES, GPU_TOKENS, (bf16,))
        + _run_cases("oft", 4, IMPLS_OFT, ((4096, 4096), (8192, 8192)), (1, 4096), (bf16,))
        + _merge_cases("lora", 8, ("reference", "peft"), ((4096, 4096),), bf16)
    )


def select(cases: list[BenchCase], pattern: str | None) -> list[BenchCase]:
    """Cases whose key contains every ``,``-separated part of ``pattern`` (a cheap filter for the CLI)."""
    if not pattern:
        return cases
    parts = [p for p in pattern.split(",") if p]
    return [c for c in cases if all(p in c.key for p in parts)]
