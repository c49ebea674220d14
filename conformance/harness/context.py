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

from conformance.harness import validate
from conformance.quant import layers as qlayers
from conformance.spec.budget import Budget
from conformance.spec.clauses import Clause, ClauseFailure, ClauseInconclusive, ClauseSkipped
from conformance.spec.interface import AdapterSpec, Implementation, bits_of, limitations_of, methods_of

try:  # a skipped case inside a hypothesis property is a rejected example, not an error
    from hypothesis.errors import UnsatisfiedAssumption as _CaseSkipBase
except ImportError:  # pragma: no cover - hypothesis is a dependency
    _CaseSkipBase = Exception  # type: ignore[assignment,misc]


class CaseSkipped(_CaseSkipBase):  # type: ignore[misc,valid-type]
    """One case needs a capability the implementation lacks: the case is left out (with a note), the rest
    of the clause runs. Inside a hypothesis property it rejects the example (hypothesis draws another)."""


#: Adapter parameters that need a capability: (param, predicate on its value, capability).
GATED_PARAMS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_rslora", bool, "rslora"),
    ("lora_bias", bool, "lora_bias"),
    ("lora_dropout", lambda v: bool(v and float(v) > 0), "dropout"),
    ("module_dropout", lambda v: bool(v and float(v) > 0), "dropout"),
)


@dataclass
class CheckContext:
    impl: Implementation
    clause: Clause
    device: str = "cpu"
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    #: where checks write artefacts (stateful reproducer scripts); None: a fresh temporary directory
    report_dir: str | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the one (method, bits) case family this context is narrowed to (``execute`` runs a check per family)
    family: tuple[str, int] | None = None
    #: layers built and cases skipped for a missing capability (a family that built nothing but skipped
    #: cases is reported skipped, not passed)
    layers_built: int = 0
    cases_skipped: dict[str, int] = field(default_factory=dict)
    #: (layer, what its base was) for every layer built, so a malformed one is named (``malformed``)
    built: list[tuple[nn.Module, Any]] = field(default_factory=list, repr=False)
    #: messages of the CaseSkipped raised in this context (a check that catches them broadly and fails with
    #: their text is reported skipped, not failed: see ``execute``)
    case_skip_messages: list[str] = field(default_factory=list, repr=False)

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
        got = sorted(self.clause.methods & methods_of(self.impl))
        if self.family is not None:
            got = [m for m in got if m == self.family[0]]
        if not got:
            self.skip(f"{self.impl.name} implements none of {sorted(self.clause.methods)}")
        limits = limitations_of(self.impl)
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
        got = sorted(self.clause.bits & bits_of(self.impl))
        if self.family is not None:
            got = [b for b in got if b == self.family[1]]
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

    def has(self, capability: str, method: str | None = None) -> bool:
        """Whether the implementation declares ``capability`` (and no limitation of it for ``method``)."""
        if capability not in self.impl.capabilities:
            return False
        return method is None or f"{capability}/{method}" not in limitations_of(self.impl)

    def skip_case(self, capability: str, label: str = "") -> None:
        """Record that a case needing ``capability`` was left out (one note per capability, with a count)."""
        n = self.cases_skipped.get(capability, 0)
        self.cases_skipped[capability] = n + 1
        if n == 0:
            self.note(f"cases needing {capability} skipped: {self.impl.name} does not declare it"
                      + (f" (first: {label})" if label else ""))
        self.measurements["cases_skipped"] = dict(self.cases_skipped)

    def require_case(self, capability: str, label: str = "", method: str | None = None) -> bool:
        """Guard for a case inside a check loop: ``if not ctx.require_case("unmerge", label): continue``."""
        if self.has(capability, method):
            return True
        self.skip_case(capability, label)
        return False

    def supports(self, params: dict[str, Any], label: str = "") -> bool:
        """Whether the implementation declares every capability the adapter ``params`` need (a guard line for
        loops over adapter cases; records the skipped case when not)."""
        for key, needs, cap in GATED_PARAMS:
            if needs(params.get(key)) and cap not in self.impl.capabilities:
                self.skip_case(cap, label or f"{key}={params.get(key)!r}")
                return False
        return True

    # -- builders ----------------------------------------------------------------------
    def make_base(self, in_features: int = 64, out_features: int = 48, **kwargs: Any) -> nn.Module:
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("seed", self.seed)
        return qlayers.make_base_layer(in_features, out_features, **kwargs)

    def adapter_dtype(self, base: nn.Module) -> torch.dtype:
        """The adapter dtype a layer over ``base`` is built in: float32 when the implementation casts its
        input (``input_cast``), else the dtype inputs of ``base`` have in the checks (its compute dtype)."""
        if "input_cast" in self.impl.capabilities:
            return torch.float32
        return getattr(base, "compute_dtype", None) or torch.float32

    def make_layer(self, base: nn.Module, method: str, adapter_name: str = "default", **params: Any) -> nn.Module:
        """The implementation's layer over ``base`` (warnings from construction are swallowed).

        A case whose ``params`` need an undeclared capability (``GATED_PARAMS``) raises ``CaseSkipped``;
        for an implementation without ``input_cast``, a forward whose input dtype is not the adapter dtype
        does too (a forward pre-hook): the case is left out, never failed.
        """
        for key, needs, cap in GATED_PARAMS:
            if needs(params.get(key)) and cap not in self.impl.capabilities:
                self.skip_case(cap, f"{method} {key}={params.get(key)!r}")
                raise self._case_skipped(f"{self.impl.name} does not declare capability {cap} ({key}={params[key]!r})")
        dtype = self.adapter_dtype(base)
        spec = AdapterSpec(method=method, adapter_name=adapter_name, params=params,
                           dtype=str(dtype).removeprefix("torch."))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed)
            exp = validate.expected_of(base)
            layer = self.impl.create(base, spec)
        self.layers_built += 1
        if exp is not None and isinstance(layer, nn.Module):
            self.built.append((layer, exp))
        if "input_cast" not in self.impl.capabilities and isinstance(layer, nn.Module):
            layer.register_forward_pre_hook(self._input_dtype_gate(dtype))
        return layer

    def _case_skipped(self, message: str) -> CaseSkipped:
        self.case_skip_messages.append(message)
        return CaseSkipped(message)

    def malformed(self) -> list[str]:
        """What is wrong with the layers this context built (``harness.validate``; empty when all are sound)."""
        out = []
        for layer, exp in self.built:
            out += [p for p in validate.problems(layer, exp) if p not in out]
        return out

    def _input_dtype_gate(self, dtype: torch.dtype) -> Callable[..., None]:
        def gate(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
                self.skip_case("input_cast", f"{x.dtype} input to {dtype} adapters")
                raise self._case_skipped(f"{self.impl.name} does not declare input_cast: a {x.dtype} input to "
                                         f"{dtype} adapters is left out")
        return gate

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator(offset)).to(device=self.device, dtype=dtype)
