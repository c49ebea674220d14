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
5. OFT on 4-bit (reference and PEFT), 8-bit merge / unmerge;
6. DoRA r=16 (``LoraConfig(use_dora=True)``) at the training token counts (:data:`TRAINING_TOKENS`), forward and
   forward+backward, 4-bit NF4+DQ at every shape and 8-bit at two: the bare layer, the measured floor (LoRA's plus
   the weight norm, ``conformance.bench.roofline``), the reference and PEFT. Timed on request: ``methods``
   (``--methods dora`` runs these alone; the default, :data:`conformance.bench.DEFAULT_METHODS`, is the stored
   baselines' matrix).

Shapes are ``(in_features, out_features)`` and labelled ``"{in}x{out}"``: 4096x11008 is a LLaMA-7B
up-projection, 11008x4096 its down-projection, 8192x28672 a LLaMA-70B MLP projection. Base layers have
no bias (LLaMA) and store their weight in the compute dtype (as ``from_pretrained(torch_dtype=...)``
with a ``BitsAndBytesConfig`` leaves it). Adapters are held in the compute dtype too; B is random
(never time on zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from conformance.clauses.cases import AdapterCase, BaseCase, OnBase
from conformance.core.vocabulary import LORA_LIKE
from conformance.quant.torchnames import dtype_name, dtype_of

from . import DEFAULT_METHODS, METHODS

GPU_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672))
GPU_TOKENS: tuple[int, ...] = (1, 512, 4096, 16384)  # 1 = decode, 16384 = a training micro-batch
GPU_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

#: Token counts of a training step (a micro-batch of 4096 and of 16384 tokens): where the speed targets and the
#: DoRA rows are taken.
TRAINING_TOKENS: tuple[int, ...] = (4096, 16384)

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
#: DoRA: the bare layer, the measured floor (``roofline.floor_fn`` with the weight norm), the reference and PEFT.
IMPLS_DORA = ("bnb", "floor", "reference", "peft")
OPS_RUN = ("fwd", "fwdbwd")
OPS_MERGE = ("merge", "unmerge")

#: Main shapes for the report table.
MAIN_SHAPES = ((4096, 4096), (8192, 28672))


def bench_base(bits: int, in_features: int, out_features: int, dtype: str, *, quant_type: str = "nf4",
               double_quant: bool = True) -> BaseCase:
    """The base of a benchmark: no bias (LLaMA), the weight stored in the compute dtype, blocksize 64."""
    dt = dtype_of(dtype)
    return BaseCase(bits, in_features, out_features, quant_type=quant_type, blocksize=64, double_quant=double_quant,
                    compute_dtype=dt, bias=False, weight_dtype=dt)


def bench_adapter(method: str, rank: int = RANK, alpha: int = ALPHA) -> AdapterCase:
    """The adapter of a benchmark: LoRA or DoRA rank ``rank`` (random A and B), or OFT with PEFT's default block
    size."""
    if method in LORA_LIKE:
        return AdapterCase(method, {"r": rank, "lora_alpha": alpha, "init_lora_weights": False})
    if method == "oft":
        return AdapterCase("oft", {"r": 0, "oft_block_size": OFT_BLOCK_SIZE, "init_weights": False})
    raise ValueError(f"unknown method {method!r}: one of lora, dora, oft")


@dataclass(frozen=True)
class BenchCase(OnBase):
    """One timed measurement: an implementation running one operation (``op``) on ``tokens`` tokens through an
    adapter (``adapter``) over a base layer (``base``). The flat JSON form (:meth:`to_dict`, read back by
    :meth:`from_dict`) keeps the keys of every stored benchmark."""

    impl: str  # one of IMPLS_LORA
    base: BaseCase
    #: the method of the group ("bnb" rows carry it too: their layer has no adapter)
    adapter: AdapterCase
    tokens: int
    op: str  # fwd | fwdbwd | merge | unmerge

    #: the flat keys of a stored case (before ``key``/``group``/``shape``), in their order
    FLAT_KEYS: ClassVar[tuple[str, ...]] = ("impl", "method", "bits", "in_features", "out_features", "tokens", "dtype",
                                            "op", "quant_type", "double_quant", "rank", "alpha")

    @classmethod
    def make(cls, impl: str, method: str, bits: int, in_features: int, out_features: int, tokens: int, dtype: str,
             op: str, *, quant_type: str = "nf4", double_quant: bool = True, rank: int = RANK,
             alpha: int = ALPHA) -> BenchCase:
        """A case from its flat description (the order of :attr:`FLAT_KEYS`)."""
        return cls(impl, bench_base(bits, in_features, out_features, dtype, quant_type=quant_type,
                                    double_quant=double_quant), bench_adapter(method, rank, alpha), tokens, op)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchCase:
        """The case of a stored record (:meth:`to_dict`; extra keys such as timings are ignored)."""
        return cls.make(**{k: d[k] for k in cls.FLAT_KEYS if k in d})

    @property
    def method(self) -> str:
        return self.adapter.method

    @property
    def rank(self) -> int:
        """The LoRA / DoRA rank (OFT rows carry the suite's ``RANK``, as stored benchmarks do)."""
        return self.adapter.params.get("r", RANK) if self.method in LORA_LIKE else RANK

    @property
    def alpha(self) -> int:
        return self.adapter.params.get("lora_alpha", ALPHA) if self.method in LORA_LIKE else ALPHA

    @property
    def shape(self) -> str:
        return self.base.shape_label

    @property
    def group(self) -> str:
        """Everything but the implementation: rows of one group are compared with each other."""
        t = f"t{self.tokens}" if self.op in OPS_RUN else "t-"
        return f"{self.method}-{self.base.quant_label}/{self.op}/{self.shape}/{t}/{self.dtype}"

    @property
    def key(self) -> str:
        """Stable identifier used by compare.py and as the pytest id."""
        return f"{self.group}/{self.impl}"

    def with_impl(self, impl: str) -> BenchCase:
        return replace(self, impl=impl)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.FLAT_KEYS}
        d.update(key=self.key, group=self.group, shape=self.shape)
        return d


def _run_cases(method: str, bits: int, impls: tuple[str, ...], shapes, tokens, dtypes, **kw: Any) -> list[BenchCase]:
    out = []  # grouped by base layer (dtype, shape) so the runner builds each base once
    for dtype in dtypes:
        for (i, o) in shapes:
            for op in OPS_RUN:
                for t in tokens:
                    for impl in impls:
                        out.append(BenchCase.make(impl, method, bits, i, o, t, dtype_name(dtype), op, **kw))
    return out


def _merge_cases(method: str, bits: int, impls: tuple[str, ...], shapes, dtype: torch.dtype, **kw: Any) -> list[BenchCase]:
    return [BenchCase.make(impl, method, bits, i, o, 0, dtype_name(dtype), op, **kw)
            for (i, o) in shapes for op in OPS_MERGE for impl in impls]


def matrix(device: str = "cuda", quick: bool = False, methods: Sequence[str] = DEFAULT_METHODS) -> list[BenchCase]:
    """The cases of ``methods`` (default: the stored baselines' matrix, LoRA and OFT) in priority order. ``quick`` is
    the CPU smoke (tiny shapes, one token count)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}: the benchmarks time {', '.join(METHODS)}")
    return [c for c in _all_cases(device, quick) if c.method in methods]


def _all_cases(device: str, quick: bool) -> list[BenchCase]:
    if quick:
        dt = (torch.bfloat16,) if device == "cuda" else (torch.float32,)
        shapes, tokens = QUICK_SHAPES, QUICK_TOKENS
        return (
            _run_cases("lora", 4, IMPLS_LORA, shapes, tokens, dt)
            + _run_cases("lora", 8, ("bnb", "floor-bare", "floor", "reference", "peft"), shapes, tokens, dt)
            + _run_cases("oft", 4, ("reference", "peft"), shapes, tokens, dt)
            + _merge_cases("lora", 4, ("reference", "peft"), shapes, dt[0])
            + _run_cases("dora", 4, IMPLS_DORA, shapes, tokens, dt)
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
        + dora_cases()
    )


def dora_cases() -> list[BenchCase]:
    """DoRA at the training shapes (bfloat16): 4-bit NF4+DQ at every shape, 8-bit at two (96 cases)."""
    bf16 = (torch.bfloat16,)
    return (_run_cases("dora", 4, IMPLS_DORA, GPU_SHAPES, TRAINING_TOKENS, bf16)
            + _run_cases("dora", 8, IMPLS_DORA, ((4096, 4096), (8192, 8192)), TRAINING_TOKENS[:1], bf16))


def select(cases: list[BenchCase], pattern: str | None) -> list[BenchCase]:
    """Cases whose key contains every ``,``-separated part of ``pattern`` (a cheap filter for the CLI)."""
    if not pattern:
        return cases
    parts = [p for p in pattern.split(",") if p]
    return [c for c in cases if all(p in c.key for p in parts)]
