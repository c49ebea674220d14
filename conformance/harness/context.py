"""What a check gets to work with, and how it reports.

A check is ``def check(ctx: CheckContext) -> None``. It builds layers through ``ctx.make_layer``
(the implementation under test) and bases through ``ctx.make_base`` (so every case is described
by data, OpInfo style), records numbers with ``ctx.measure`` and fails with ``ctx.fail`` or a
plain ``assert``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conformance.quant import layers as qlayers
from conformance.spec.budget import Budget
from conformance.spec.clauses import Clause, ClauseFailure, ClauseInconclusive, ClauseSkipped
from conformance.spec.interface import AdapterSpec, Implementation


@dataclass
class CheckContext:
    impl: Implementation
    clause: Clause
    device: str = "cpu"
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    report_dir: str | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # -- outcome helpers ---------------------------------------------------------------
    def fail(self, message: str) -> None:
        raise ClauseFailure(message)

    def skip(self, reason: str) -> None:
        raise ClauseSkipped(reason)

    def inconclusive(self, reason: str) -> None:
        """End the check as ``inconclusive``: the implementation cut it short (see ``ClauseInconclusive``)."""
        raise ClauseInconclusive(reason)

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def measure(self, key: str, value: Any) -> None:
        """Record a number (or small JSON value) for the report; floats keep 4 significant digits."""
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if isinstance(value, float):
            value = float(f"{value:.4g}")
        self.measurements[key] = value

    def measure_max(self, key: str, value: float) -> None:
        """Keep the largest value seen under ``key`` (worst case over a case family)."""
        old = self.measurements.get(key)
        if old is None or value > old:
            self.measure(key, float(value))

    def bounded(self, key: str, ratio: float, message: Callable[[], str]) -> None:
        """The clauses' one bound test: keep the worst observed/bound ``ratio`` under ``key`` (a
        non-finite ratio is recorded as inf) and fail with ``message()`` unless ``ratio <= 1`` (NaN fails).
        ``message`` is called only on failure: describing the worst element scans the whole tensor."""
        self.measure_max(key, ratio if math.isfinite(ratio) else float("inf"))
        if not ratio <= 1.0:
            self.fail(message())

    def note(self, text: str) -> None:
        self.notes.append(text)

    # -- what applies ------------------------------------------------------------------
    def methods(self) -> list[str]:
        """Methods both the clause and the implementation cover (skips if none).

        A method for which the implementation declares a limitation on one of the clause's required
        capabilities (``limitations["mixed_batch/oft"] = reason``) is left out, with a note.
        """
        got = sorted(self.clause.methods & self.impl.methods())
        if not got:
            self.skip(f"{self.impl.name} implements none of {sorted(self.clause.methods)}")
        limits = getattr(self.impl, "limitations", None) or {}
        kept = []
        for m in got:
            hit = [f"{cap}/{m}" for cap in sorted(self.clause.requires) if f"{cap}/{m}" in limits]
            if hit:
                self.note(f"{m} left out: {limits[hit[0]]}")
                self.measure(f"excluded.{m}", hit[0])
            else:
                kept.append(m)
        if not kept:
            self.skip("; ".join(self.notes) or f"{self.impl.name} declares limitations for every method")
        return kept

    def bits(self) -> list[int]:
        got = sorted(self.clause.bits & self.impl.bits())
        if not got:
            self.skip(f"{self.impl.name} supports none of the bit widths {sorted(self.clause.bits)}")
        return got

    def cases(self) -> Iterator[tuple[str, int]]:
        """(method, bits) pairs the clause applies to for this implementation."""
        pairs = [(m, b) for m in self.methods() for b in self.bits()]
        yield from pairs

    def require(self, *capabilities: str) -> None:
        missing = [c for c in capabilities if c not in self.impl.capabilities]
        if missing:
            self.skip(f"{self.impl.name} does not declare capability {', '.join(missing)}")

    # -- builders ----------------------------------------------------------------------
    def make_base(self, in_features: int = 64, out_features: int = 48, **kwargs: Any) -> nn.Module:
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("seed", self.seed)
        return qlayers.make_base_layer(in_features, out_features, **kwargs)

    def make_layer(self, base: nn.Module, method: str, adapter_name: str = "default", **params: Any) -> nn.Module:
        """The implementation's layer over ``base`` (warnings from construction are swallowed)."""
        spec = AdapterSpec(method=method, adapter_name=adapter_name, params=params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed)
            return self.impl.create(base, spec)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator(offset)).to(device=self.device, dtype=dtype)
