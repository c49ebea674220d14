"""What a check gets to work with, and how it reports.

A check is ``def check(ctx: CheckContext) -> None``. It builds layers through ``ctx.make_layer``
(the implementation under test) and bases through ``ctx.make_base`` (so every case is described
by data, OpInfo style), records numbers with ``ctx.measure`` and fails with ``ctx.fail`` or a
plain ``assert``.

**Cases.** A check runs once per case family (``execute``); inside it, each case is one
``with ctx.case(label):`` block (building its own layer). A case ends at its first failure, and the
family goes on with the next case, so one failure never hides a later one:

- a case that needs an undeclared capability (``CaseSkipped``, from ``make_layer``'s parameter gate,
  the input-dtype gate or ``ctx.supports``) or that the implementation refuses
  (``ImplementationUnsupported``, a wrapper declining an option) is *skipped*, with the reason; the
  family's other cases still run;
- a failure (``ctx.fail``, ``assert``, an exception attributed to the implementation, below) is
  recorded and the next case starts from a freshly built layer; an exception of the suite's own
  code is recorded as an error;
- ``ctx.case(label, isolate=False)`` (hypothesis properties) counts the case and lets every
  exception through (hypothesis decides; an ``ImplementationUnsupported`` becomes a rejected example).

The family's counts (cases run, cases skipped with their reasons) are ``cases_run`` and
``skip_reasons``; a check that opens no case block counts as one case.

**Attribution at the protocol boundary** (``verdict``): see ``conformance.clauses.attribution``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conformance.clauses import cases as _cases
from conformance.clauses.attribution import IMPL_CALL, CaseSkipped, _short, _skip_cause, implementation_origin, leaf
from conformance.clauses.budget import Budget
from conformance.clauses.cases import BaseCase
from conformance.clauses.clause import Clause, ClauseFailure, ClauseInconclusive, ClauseSkipped
from conformance.clauses.interface import AdapterSpec, Implementation, ImplementationUnsupported, declared
from conformance.core import upstream
from conformance.core.applicability import Applicability, applicability
from conformance.core.upstream import KnownFailure
from conformance.core.vocabulary import Capability, Declaration, capability, params_needing
from conformance.quant import validate
from conformance.quant.torchnames import dtype_name

#: settings the suite puts on a base it builds that a library rebuilding the layer may not carry over (bitsandbytes
#: 0.50.2 nn/modules.py Linear4bit.__init__ sets the CPU layout switch from the CPU; the base case sets it)
BASE_SETTINGS = ("support_avx512bf16_for_cpu", "compute_dtype", "quant_storage", "threshold")

#: how many case failures a family's message quotes (the count says how many there were)
QUOTED_FAILURES = 3


@functools.cache
def _known_list() -> list[KnownFailure]:
    """The shipped bitsandbytes known-failure list, read once per process."""
    return upstream.load()


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
    #: every object the implementation handed over (the implementation and each layer ``create`` returned):
    #: an exception out of a call into one of them is the implementation's (see the module docstring)
    impl_objects: list[Any] = field(default_factory=list, repr=False)
    #: cases run (completed or failed) and cases skipped, by reason, in ``case`` blocks and guards
    cases_run: int = 0
    cases_opened: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    #: (outcome, message) of every case that failed or errored (the family goes on with the next case)
    case_outcomes: list[tuple[str, str]] = field(default_factory=list)
    #: the string the implementation was loaded from (a built-in name, entry point or ``module:attr``; None for an
    #: object built in this process): the stateful machine's reproducers rebuild it from this
    target: str | None = None
    _case_depth: int = field(default=0, repr=False)
    #: id(layer) -> the adapter dtype its inputs must have (implementations without ``input_cast``)
    _input_dtypes: dict[int, torch.dtype] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.impl_objects.append(self.impl)
        #: what the implementation declares, read once (``conformance.core.vocabulary``)
        self.declaration: Declaration = declared(self.impl)
        #: what of the clause applies to it on this device (``conformance.core.applicability``)
        self.applies: Applicability = applicability(self.clause, self.declaration, self.device, self.impl.name)

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
        """Methods both the clause and the implementation cover (skips if none; ``applicability`` decides).

        A method for which the implementation declares a limitation on one of the clause's required
        capabilities (``limitations = {"mixed_batch": {"oft": reason}}``) is left out, with a note.
        """
        got = [str(m) for m in self.applies.methods if self.family is None or m == self.family[0]]
        if not got:
            self.skip(f"{self.impl.name} implements none of {sorted(str(m) for m in self.clause.methods)}")
        kept = []
        for m in got:
            hit = self.applies.excluded.get(m)  # type: ignore[call-overload]
            if hit:
                self.note(f"{m} left out: {hit[1]}")
                self.measure(f"excluded.{m}", f"{hit[0]}/{m}")
            else:
                kept.append(m)
        if not kept:
            self.skip("; ".join(self.notes) or f"{self.impl.name} declares limitations for every method")
        return kept

    def bits(self) -> list[int]:
        got = [b for b in self.applies.bits if self.family is None or b == self.family[1]]
        if not got:
            self.skip(f"{self.impl.name} supports none of the bit widths {sorted(self.clause.bits)}")
        return got

    def cases(self) -> Iterator[tuple[str, int]]:
        """(method, bits) pairs the clause applies to for this implementation."""
        pairs = [(m, b) for m in self.methods() for b in self.bits()]
        yield from pairs

    def require(self, *capabilities: str) -> None:
        missing = [str(c) for c in capabilities if not self.declaration.has(c)]
        if missing:
            self.skip(f"{self.impl.name} does not declare capability {', '.join(missing)}")

    def has(self, capability: str, method: str | None = None) -> bool:
        """Whether the implementation declares ``capability`` (and no limitation of it for ``method``);
        an unknown capability name is an error (``conformance.core.vocabulary.UnknownName``)."""
        return self.declaration.has(capability, method)

    def skip_case(self, name: str, label: str = "") -> None:
        """Record that a case needing capability ``name`` was left out (one note per capability, with a count)."""
        name = str(capability(name))
        n = self.cases_skipped.get(name, 0)
        self.cases_skipped[name] = n + 1
        self._skipped(f"{name} not declared")
        if n == 0:
            self.note(f"cases needing {name} skipped: {self.impl.name} does not declare it"
                      + (f" (first: {label})" if label else ""))
        self.measurements["cases_skipped"] = dict(self.cases_skipped)

    def skip_this_case(self, reason: str) -> None:
        """End the current ``case`` block as skipped with ``reason`` (the case does not apply to this layer)."""
        self._skipped(reason)
        raise self._case_skipped(reason)

    def require_case(self, capability: str, label: str = "", method: str | None = None) -> bool:
        """Guard for a case inside a check loop: ``if not ctx.require_case("unmerge", label): continue``."""
        if self.has(capability, method):
            return True
        self.skip_case(capability, label)
        return False

    def supports(self, params: dict[str, Any], label: str = "") -> bool:
        """Whether the implementation declares every capability the adapter ``params`` need (a guard line for
        loops over adapter cases; records the skipped case when not)."""
        for key, cap in params_needing(params):
            if not self.declaration.has(cap):
                self.skip_case(cap, label or f"{key}={params.get(key)!r}")
                return False
        return True

    # -- the base-layer matrix -----------------------------------------------------------
    def base_matrix(self, bits: int, *, merges: bool = False, pinned: dict[str, Any] | None = None,
                    costly: bool = False) -> list[BaseCase]:
        """The bases of ``cases.base_matrix(bits)`` for this run's tier (``Budget.slow``): a covering of every pair of
        values by default, the full product in the slow tier; ``costly`` (clauses whose every case is expensive:
        compile): every value once by default, every pair in the slow tier. ``merges`` and ``pinned`` as there.

        Records the coverage that ran (``details["base_matrix"]``: ``pairwise``, ``full product`` or ``each value``)
        and how many bases it has per bit width (``details["base_matrix_cases"]``), so a verdict never claims
        the full product when a covering ran. Only a clause declared ``tiered`` may call it (its slow-tier run
        differs from its default one)."""
        if not self.clause.tiered:
            raise RuntimeError(f"{self.clause.id} reads the base-layer matrix but is not declared tiered=True "
                               "(conformance.clauses.clause.declare): its slow tier would not be run")
        full = self.budget.slow and not costly
        strength = 2 if self.budget.slow or not costly else 1
        got = _cases.base_matrix(bits, full=full, strength=strength, merges=merges, pinned=pinned)
        coverage = "full product" if full else "pairwise" if strength == 2 else "each value"
        seen = self.measurements.get("base_matrix")
        if seen is not None and seen != coverage:  # one coverage per verdict
            raise RuntimeError(f"{self.clause.id} mixes base-matrix coverages ({seen}, {coverage})")
        self.measure("base_matrix", coverage)
        self.measure("base_matrix_cases", {**self.measurements.get("base_matrix_cases", {}), f"{bits}bit": len(got)})
        return got

    # -- builders ----------------------------------------------------------------------
    def make_base(self, case: BaseCase, *, seed: int | None = None, weight: torch.Tensor | None = None) -> nn.Module:
        """The quantized base layer of ``case`` on this context's device (``seed``: the context's by default;
        ``weight``: the float weight to quantize, drawn from the seed when None); a case that cannot be built here
        (``BaseCase.unavailable``: the CPU packed layout elsewhere) is skipped."""
        why = case.unavailable(self.device)
        if why is not None:
            self.skip_this_case(why)
        return case.build(self.device, seed=self.seed if seed is None else seed, weight=weight)

    def adapter_dtype(self, base: nn.Module) -> torch.dtype:
        """The adapter dtype a layer over ``base`` is built in: float32 when the implementation casts its
        input (``input_cast``), else the dtype inputs of ``base`` have in the checks (its compute dtype)."""
        if self.declaration.has(Capability.INPUT_CAST):
            return torch.float32
        return getattr(base, "compute_dtype", None) or torch.float32

    def make_layer(self, base: nn.Module, method: str, adapter_name: str = "default", **params: Any) -> nn.Module:
        """The implementation's layer over ``base`` (warnings from construction are swallowed).

        A DoRA layer with ``init_lora_weights=False`` gets a trained magnitude (``cases.trained_magnitude``).
        A case whose ``params`` need an undeclared capability (``vocabulary.params_needing``) raises ``CaseSkipped``;
        for an implementation without ``input_cast``, a forward whose input dtype is not the adapter dtype
        does too (a forward pre-hook): the case is left out, never failed.
        """
        for key, cap in params_needing(params):
            if not self.declaration.has(cap):
                self.skip_case(cap, f"{method} {key}={params.get(key)!r}")
                raise self._case_skipped(f"{self.impl.name} does not declare capability {cap} ({key}={params[key]!r})")
        dtype = self.adapter_dtype(base)
        spec = AdapterSpec(method=method, adapter_name=adapter_name, params=params,
                           dtype=dtype_name(dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(self.seed)
            exp = validate.expected_of(base)
            try:
                layer = self.impl.create(base, spec)
            except Exception as exc:
                with contextlib.suppress(Exception):  # an exception type with __slots__ keeps no tag
                    setattr(exc, IMPL_CALL, "create")
                raise
        if method == "dora" and params.get("init_lora_weights", True) is False:
            keys = set(layer.adapter_parameters(adapter_name))
            if _cases.DORA_MAGNITUDE not in keys:  # the implementation's gap, not a crash of ours
                self.fail(f"DoRA layer: adapter_parameters({adapter_name!r}) has no {_cases.DORA_MAGNITUDE!r} "
                          f"(keys {sorted(keys)})")
            _cases.trained_magnitude(layer, adapter_name, self.generator(offset=7))
        self.layers_built += 1
        self.impl_objects.append(layer)
        self._note_rebuilt_base(base, layer)
        if exp is not None and isinstance(layer, nn.Module):
            self.built.append((layer, exp))
        if not self.declaration.has(Capability.INPUT_CAST) and isinstance(layer, nn.Module):
            layer.register_forward_pre_hook(self._input_dtype_gate(dtype))
            self._input_dtypes[id(layer)] = dtype
        return layer

    def _note_rebuilt_base(self, given: nn.Module, layer: nn.Module) -> None:
        """Count a ``base_layer`` that is not the object handed over (a library that rebuilds the quantized layer, or
        whose layer *is* it) and the base settings it does not carry over; every check reads the returned one
        (``conformance.clauses.ownership``)."""
        returned = getattr(layer, "base_layer", None)
        if returned is None or returned is given:
            return
        self.measurements["bases_rebuilt"] = self.measurements.get("bases_rebuilt", 0) + 1
        changed = {k: [getattr(given, k), getattr(returned, k, None)] for k in BASE_SETTINGS
                   if hasattr(given, k) and getattr(returned, k, None) != getattr(given, k)}
        if changed:
            seen = self.measurements.setdefault("base_settings_not_carried_over", {})
            for k, pair in changed.items():
                seen.setdefault(k, str(pair))

    def admit_input(self, layer: nn.Module, x: torch.Tensor) -> None:
        """The input gate of ``make_layer``, applied before the call: a check that runs ``layer`` where the pre-hook
        cannot raise the skip itself (under ``torch.compile`` dynamo traces the hook, and an exception it raises
        there comes back as dynamo's) leaves the case out here, in eager code."""
        dtype = self._input_dtypes.get(id(layer))
        if dtype is not None:
            self._input_dtype_gate(dtype)(layer, (x,))

    # -- cases ---------------------------------------------------------------------------
    def _skipped(self, reason: str) -> None:
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    @property
    def cases_skipped_total(self) -> int:
        return sum(self.skip_reasons.values())

    def known_upstream(self, key: str) -> KnownFailure | None:
        """The shipped known failure listing ``key`` for the running bitsandbytes (or transformers) on this CPU
        (``conformance.core.upstream``), for ``case(..., known=...)``; None when it is not listed."""
        import bitsandbytes

        from conformance.quant import layers as qlayers

        features = {"avx512_bf16": qlayers.cpu_packed_layout_available}
        versions = {"bitsandbytes": bitsandbytes.__version__}
        try:
            from importlib.metadata import version

            versions["transformers"] = version("transformers")
        except Exception:  # noqa: BLE001 - not installed: no transformers entry applies
            pass
        return upstream.find(_known_list(), key, versions, lambda f: features[f]())

    @contextlib.contextmanager
    def case(self, label: str, *, isolate: bool = True, known: KnownFailure | None = None) -> Iterator[None]:
        """One case of the family: ``with ctx.case(label): <build a layer, check it>``.

        Counts the case as run or skipped. With ``isolate`` (loops), a skip, a failure or an error ends this
        case only: it is recorded (``case_outcomes``, ``skip_reasons``) and the check goes on with its next
        case. Without it (hypothesis properties), the case is counted and every exception goes through, an
        ``ImplementationUnsupported`` as a ``CaseSkipped`` (a rejected example). A nested block is part of
        the outer case. ``ClauseSkipped`` / ``ClauseInconclusive`` always end the family.

        ``known``: a listed bitsandbytes failure (``known_upstream``): the case is recorded ``xfailed`` when it
        fails or errors with the entry's error text, ``xpassed`` when it passes (passed, with a note, for an entry an
        implementation can work around: ``avoidable``), and as usual otherwise.
        """
        if self._case_depth:
            yield
            return
        self._case_depth += 1
        self.cases_opened += 1
        first_built = len(self.built)
        try:
            yield
        except (KeyboardInterrupt, SystemExit, GeneratorExit, ClauseSkipped, ClauseInconclusive):
            raise
        except BaseException as exc:  # noqa: BLE001 - every exception of a case is an outcome
            outcome, message = self.verdict(exc, label, since=first_built)
            if outcome == "case-skipped":
                if not isolate:
                    if isinstance(exc, CaseSkipped):
                        raise
                    raise CaseSkipped(message) from exc
                return
            self.cases_run += 1
            if not isolate:
                raise
            if outcome in ("skipped", "inconclusive"):
                raise
            if known is not None and outcome in ("failed", "error") and known.matches(message):
                outcome, message = "xfailed", f"{message} [{known.describe()}]"
            self.case_outcomes.append((outcome, message))
        else:
            self.cases_run += 1
            if known is not None and self._case_depth == 1:
                if known.avoidable:  # this implementation works around it
                    note = f"worked around bitsandbytes known failure {known.key}"
                    if note not in self.notes:
                        self.notes.append(note)
                else:
                    self.case_outcomes.append(("xpassed", f"{label}: passed although listed as {known.describe()} "
                                                          "(fixed upstream? remove the entry)"))
        finally:
            self._case_depth -= 1

    def verdict(self, raw: BaseException, label: str = "", since: int = 0) -> tuple[str, str]:
        """(outcome, message) for an exception out of a check or one of its cases: ``case-skipped`` (a
        ``CaseSkipped`` or an ``ImplementationUnsupported``, recorded in ``skip_reasons``), ``skipped``,
        ``inconclusive``, ``failed`` (a failed check, or an exception out of the implementation, or a crash on
        a layer the implementation left malformed) or ``error`` (the suite's own code raised).
        ``since``: only layers built from this index on are checked for malformation."""
        exc = leaf(raw)
        skip = _skip_cause(exc) or _skip_cause(raw)
        if skip is None and any(m in str(raw) or m in str(exc) for m in self.case_skip_messages):
            skip = CaseSkipped(next(m for m in self.case_skip_messages if m in str(raw) or m in str(exc)))
        if skip is not None and not isinstance(exc, (ClauseSkipped, ClauseInconclusive)):
            if isinstance(skip, ImplementationUnsupported):
                self._skipped(f"refused by {self.impl.name}: {skip}")
            # a CaseSkipped was recorded where it was raised (skip_case)
            return "case-skipped", str(skip)
        prefix = f"{label}: " if label else ""
        if isinstance(exc, ClauseSkipped):
            return "skipped", str(exc)
        if isinstance(exc, ClauseInconclusive):
            return "inconclusive", str(exc)
        origin = self.implementation_origin(exc)
        if origin is not None:
            text = f"{prefix}{type(exc).__name__}: {exc} ({origin})"
            bad = self._malformed(since, text)
            return "failed", ("malformed layer: " + "; ".join(bad) + f" ({text})") if bad else text
        if isinstance(exc, (ClauseFailure, AssertionError)):
            msg = str(exc) or f"{prefix}assertion failed in {self.clause.check.__name__}"
            handled = exc.__context__  # a check that caught the implementation's exception and failed with it
            if handled is not None and type(handled).__name__ in msg:
                origin = self.implementation_origin(handled)
                if origin is not None:
                    msg += f" ({origin})"
            bad = self._malformed(since, msg)
            return "failed", ("malformed layer: " + "; ".join(bad) + f" ({msg})") if bad else msg
        if type(exc).__name__ == "Unsatisfiable":  # hypothesis: every example was rejected (skipped)
            return "inconclusive", "no case ran: every drawn case was skipped (" + self.skip_summary() + ")"
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {_short(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
        crash = f"{prefix}{type(exc).__name__}: {exc}{where}"
        bad = self._malformed(since, crash)
        if bad:  # the implementation broke the layer; the check crashed on it: a failure that says what is wrong
            return "failed", "malformed layer: " + "; ".join(bad) + f" (the check then raised {crash})"
        return "error", crash

    def skip_summary(self) -> str:
        return ", ".join(f"{r}: {n}" for r, n in sorted(self.skip_reasons.items())) or "no case was drawn"

    def _malformed(self, since: int = 0, named: str = "") -> list[str]:
        """Problems of the layers built from index ``since`` on, less those the message ``named`` already names."""
        try:
            out: list[str] = []
            for layer, exp in self.built[since:]:
                out += [p for p in validate.problems(layer, exp) if p not in out and p not in named]
            return out
        except Exception as exc:  # noqa: BLE001 - validation must never turn an outcome into a crash
            return [f"base layer cannot be inspected ({type(exc).__name__}: {exc})"]

    def implementation_origin(self, exc: BaseException) -> str | None:
        """Where ``exc`` left the implementation ("raised in litgpt/lora.py:123 in forward, called from
        forward.py:85"), or None when the suite's own code raised it (see the module docstring)."""
        return implementation_origin(exc, self.impl_objects, CheckContext.make_layer.__code__)

    def _case_skipped(self, message: str) -> CaseSkipped:
        self.case_skip_messages.append(message)
        return CaseSkipped(message)

    def malformed(self) -> list[str]:
        """What is wrong with the layers this context built (``quant.validate``; empty when all are sound)."""
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

