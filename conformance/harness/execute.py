"""Running one clause's check in this process, once per case family, so no failing case hides another.

A clause's cases fall into families, one per (method, bits) pair the clause and the implementation
share (``lora/4bit``, ``oft/8bit``, ...). The check runs once per family with a context narrowed to it
(``CheckContext.family``); the family outcomes are then aggregated:

- ``failed`` if any family failed; else ``error`` if any errored (a crash in the check or the
  implementation); else ``inconclusive`` if any was; else ``passed`` if any passed; else ``skipped``
  (every family skipped, e.g. every case needed a capability the implementation lacks);
- a check that crashes on a layer the implementation left malformed (``harness.validate``) is
  ``failed`` with what is wrong, not ``error``;
- a check that catches a ``CaseSkipped`` broadly (``except Exception``) and fails with its text leaves
  that family ``skipped`` with the reason (never ``failed`` for an undeclared capability);
- a family that ran no case (built no layer) but skipped some for a missing capability is ``skipped``;
- measurements are combined over families (``_combine``: counts add up, ratios keep the worst, lists
  concatenate);
- the message names every failing/erroring family (``lora/4bit: ...; oft/8bit: error: ...``) and
  ``measurements["families"]`` maps every family to its outcome (and message unless passed).

Clauses of area ``stateful`` report from one shared machine run over all families and run unsplit.
"""

from __future__ import annotations

import time
import traceback
import warnings
from typing import Any

from conformance.core.outcome import Outcome
from conformance.harness.context import CaseSkipped, CheckContext
from conformance.harness.results import Result, applicability
from conformance.spec.budget import Budget
from conformance.spec.clauses import Clause, ClauseFailure, ClauseInconclusive, ClauseSkipped
from conformance.spec.interface import Implementation, bits_of, methods_of

#: areas whose check reports over all families at once
UNSPLIT_AREAS = frozenset({"stateful"})


def families(clause: Clause, impl: Implementation) -> list[tuple[str, int]]:
    """The (method, bits) case families of ``clause`` for ``impl``."""
    return [(m, b) for m in sorted(clause.methods & methods_of(impl)) for b in sorted(clause.bits & bits_of(impl))]


def _leaf(exc: BaseException) -> BaseException:
    """The exception that decides the outcome (a hypothesis ExceptionGroup of several bugs: a failure first)."""
    group = getattr(exc, "exceptions", None)  # BaseExceptionGroup (hypothesis reports several bugs so)
    if isinstance(group, tuple) and group:
        leaves = [_leaf(e) for e in group]
        for kinds in ((ClauseFailure, AssertionError), (ClauseInconclusive,), (Exception,)):
            for e in leaves:
                if isinstance(e, kinds):
                    return e
    return exc


def _malformed(ctx: CheckContext) -> list[str]:
    try:
        return ctx.malformed()
    except Exception as exc:  # noqa: BLE001 - validation must never turn an outcome into a crash
        return [f"base layer cannot be inspected ({type(exc).__name__}: {exc})"]


def _outcome(ctx: CheckContext, clause: Clause) -> tuple[str, str]:
    """Run the check in ``ctx``; (outcome, message)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clause.check(ctx)
    except BaseException as raw:  # noqa: BLE001 - every exception of a check is an outcome
        if isinstance(raw, (KeyboardInterrupt, SystemExit)):
            raise
        gated = next((m for m in ctx.case_skip_messages if m in str(raw) or m in str(_leaf(raw))), None)
        if gated is not None:  # the check caught a CaseSkipped broadly and failed with it: a skipped case
            return "skipped", f"a case needed an undeclared capability, the rest of this family was not run: {gated}"
        exc = _leaf(raw)
        if isinstance(exc, ClauseSkipped):
            return "skipped", str(exc)
        if isinstance(exc, CaseSkipped):
            return "skipped", str(exc)
        if isinstance(exc, ClauseInconclusive):
            return "inconclusive", str(exc)
        if isinstance(exc, (ClauseFailure, AssertionError)):
            msg = str(exc) or f"assertion failed in {clause.check.__name__}"
            bad = _malformed(ctx)
            return "failed", ("malformed layer: " + "; ".join(bad) + f" ({msg})") if bad else msg
        if type(exc).__name__ == "Unsatisfiable" and ctx.cases_skipped:  # hypothesis: every example was a skip
            return "skipped", "every drawn case needed " + ", ".join(sorted(ctx.cases_skipped))
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        crash = f"{type(exc).__name__}: {exc}{where}"
        bad = _malformed(ctx)
        if bad:  # the implementation broke the layer; the check crashed on it: a failure that says what is wrong
            return "failed", "malformed layer: " + "; ".join(bad) + f" (the check then raised {crash})"
        return "error", crash
    if ctx.layers_built == 0 and ctx.cases_skipped:
        return "skipped", "no case could run: every case needed " + ", ".join(sorted(ctx.cases_skipped))
    return "passed", ""


def _combine(old: Any, new: Any) -> Any:
    """One measurement over two families: counts (int) add up, ratios and magnitudes (float) keep the worst
    (largest), lists are concatenated without repeats, mappings merged; anything else keeps the first."""
    if isinstance(old, bool) or isinstance(new, bool):
        return old
    if isinstance(old, int) and isinstance(new, int):
        return old + new
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return max(old, new)
    if isinstance(old, list) and isinstance(new, list):
        return old + [x for x in new if x not in old]
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    return old


def _aggregate(res: Result, runs: list[tuple[str, str, str, CheckContext]]) -> None:
    res.outcome = Outcome.worst(o for _, o, _, _ in runs)  # failed, else error, else inconclusive, ...
    measurements: dict[str, Any] = {}
    notes: list[str] = []
    skipped_cases: dict[str, int] = {}
    for _, _, _, ctx in runs:
        for k, v in ctx.measurements.items():
            if k == "cases_skipped":
                for cap, n in v.items():
                    skipped_cases[cap] = skipped_cases.get(cap, 0) + n
            elif k in measurements:
                measurements[k] = _combine(measurements[k], v)
            else:
                measurements[k] = v
        notes += [n for n in ctx.notes if n not in notes]
    if skipped_cases:
        measurements["cases_skipped"] = skipped_cases
    if len(runs) == 1:
        res.message = runs[0][2]
    else:
        measurements["families"] = {f: o if o == "passed" else f"{o}: {m}" for f, o, m, _ in runs}
        if res.outcome.is_failure:
            bad = [(f, o, m) for f, o, m, _ in runs if Outcome(o).is_failure]
            res.message = "; ".join(f"{f}: {m}" if o == res.outcome else f"{f}: {o}: {m}" for f, o, m in bad)
            if len(bad) > 1:
                res.message = f"{len(bad)} of {len(runs)} case families: " + res.message
        elif res.outcome == "skipped":
            reasons = list(dict.fromkeys(m for _, _, m, _ in runs))
            res.message = "; ".join(reasons)
    res.measurements = measurements
    if notes:
        res.measurements["notes"] = notes


def run_clause(clause: Clause, impl: Implementation, device: str = "cpu", seed: int = 0, *,
               budget: Budget | None = None, report_dir: str | None = None) -> Result:
    """Run one clause's check against one implementation, in this process (one run per case family)."""
    res = Result(clause=clause.id, implementation=impl.name, outcome="passed", level=clause.level, device=device)
    reason = applicability(clause, impl, device)
    if reason:
        res.outcome, res.message = "skipped", reason
        return res
    fams: list[tuple[str, int] | None] = [None] if clause.area in UNSPLIT_AREAS else list(families(clause, impl))
    start = time.perf_counter()
    runs = []
    for fam in fams:
        ctx = CheckContext(impl=impl, clause=clause, device=device, seed=seed, family=fam, budget=budget or Budget(),
                           report_dir=report_dir)
        outcome, message = _outcome(ctx, clause)
        runs.append((f"{fam[0]}/{fam[1]}bit" if fam else "all", outcome, message, ctx))
    res.duration_s = time.perf_counter() - start
    _aggregate(res, runs)
    return res
