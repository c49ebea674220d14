"""Running one clause's check in this process, once per case family, so no failing case hides another.

A clause's cases fall into families, one per (method, bits) pair the clause and the implementation
share (``lora/4bit``, ``oft/8bit``, ...). The check runs once per family with a context narrowed to it
(``CheckContext.family``); inside a family each case is a ``ctx.case`` block (``clauses.context``): a
case needing an undeclared capability, or refused by the implementation (``ImplementationUnsupported``),
is skipped alone, and a failing case ends only itself. A family's outcome:

- ``failed`` if a case failed (every failing case counted, the first ``QUOTED_FAILURES`` quoted): a check
  that failed, an exception out of a call into the implementation (attributed at the protocol boundary:
  ``CheckContext.verdict``), or a crash of the check on a layer the implementation left malformed
  (``quant.validate``);
- else ``error`` if the suite's own code raised;
- else ``xpassed`` if a case listed as a bitsandbytes failure (``xfails/bitsandbytes.ini``) passed;
- else ``skipped`` when the check skipped the whole family (``ctx.skip``: a method limitation);
- else ``inconclusive`` when no case ran (every case was skipped, with the reasons), or the check ended it
  so (stateful floors), or a skip outside any case block cut the family short;
- else ``xfailed`` if some case failed as a listed bitsandbytes failure does (every other case passed);
- else ``passed``.

The clause takes the first outcome present among its families in the order failed, error, xpassed, inconclusive,
xfailed, passed, skipped (``Outcome.worst``): a clause is ``passed`` only when every family that ran passed and none failed, and a
declared family that ran no case makes it ``inconclusive``. ``Result.families`` holds, per family, the
outcome, the cases run and skipped and the skip reasons (``{"run": N, "skipped": M, "skip_reasons":
{...}, "outcome": ..., "message": ...}``).
Measurements are combined over families (``_combine``: counts add up, ratios keep the worst, lists
concatenate).

Clauses of area ``stateful`` report from one shared machine run over all families and run unsplit.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from conformance.clauses.budget import Budget
from conformance.clauses.clause import Clause
from conformance.clauses.context import QUOTED_FAILURES, CheckContext
from conformance.clauses.interface import Implementation, declared
from conformance.core.applicability import applicability as _applicability
from conformance.core.applicability import family_label
from conformance.core.outcome import Outcome
from conformance.core.report import Family
from conformance.harness.results import Result

#: areas whose check reports over all families at once
UNSPLIT_AREAS = frozenset({"stateful"})


def _family_verdict(ctx: CheckContext, clause: Clause) -> tuple[str, str]:
    """Run the check in ``ctx``; (outcome, message) of the family from its cases and how the check ended."""
    ended: tuple[str, str] | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clause.check(ctx)
    except BaseException as raw:  # noqa: BLE001 - every exception of a check is an outcome
        if isinstance(raw, (KeyboardInterrupt, SystemExit)):
            raise
        ended = ctx.verdict(raw)
    if ctx.cases_opened == 0 and (ended is None or ended[0] in ("failed", "error")) \
            and (ctx.layers_built or not ctx.cases_skipped_total or ended is not None):
        ctx.cases_run = max(ctx.cases_run, 1)  # a check without case blocks is one case (unless all it did was skip)
    fails = [m for o, m in ctx.case_outcomes if o == "failed"]
    errors = [m for o, m in ctx.case_outcomes if o == "error"]
    if ended is not None and ended[0] in ("failed", "error"):
        (fails if ended[0] == "failed" else errors).append(ended[1])
    xpassed = [m for o, m in ctx.case_outcomes if o == "xpassed"]
    xfailed = [m for o, m in ctx.case_outcomes if o == "xfailed"]
    if fails:
        return "failed", _cases_message(fails, ctx, "failed")
    if errors:
        return "error", _cases_message(errors, ctx, "errored")
    if xpassed:
        return "xpassed", _cases_message(xpassed, ctx, "passed although listed as bitsandbytes failures")
    if ended is not None and ended[0] in ("skipped", "inconclusive"):
        return ended
    if ended is not None and ctx.cases_opened == 0 and ctx.layers_built > 1:  # a check without case blocks
        return "inconclusive", (f"a case was skipped ({ended[1]}); the check has no case blocks, so the rest of "
                                "this family was not run")
    if ctx.cases_run == 0:
        if ctx.cases_skipped_total:
            return "inconclusive", f"no case ran: every case was skipped ({ctx.skip_summary()})"
        return "inconclusive", "no case ran: the check drew no case for this family"
    if ended is not None:  # a case skip outside any case block: the family stopped there
        return "inconclusive", (f"{ctx.cases_run} case(s) ran, then a case was skipped outside a case block "
                                f"({ended[1]}) and the rest of this family was not run")
    if xfailed:  # every other case passed: the family fails only as bitsandbytes' listed failures do
        return "xfailed", _cases_message(xfailed, ctx, "failed as listed bitsandbytes failures")
    return "passed", ""


def _cases_message(msgs: list[str], ctx: CheckContext, what: str) -> str:
    quoted = list(dict.fromkeys(msgs))[:QUOTED_FAILURES]
    text = "; ".join(quoted)
    if len(msgs) > 1:
        more = len(msgs) - len(quoted)
        text = (f"{len(msgs)} of {ctx.cases_run} cases {what}: " + text
                + (f"; and {more} more" if more > 0 else ""))
    return text


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
    res.cases_skipped = skipped_cases
    res.families = {f: family_counts(o, m, ctx) for f, o, m, ctx in runs}
    if len(runs) == 1:
        res.message = runs[0][2]
    elif res.outcome.is_failure:
        bad = [(f, o, m) for f, o, m, _ in runs if Outcome(o).is_failure]
        res.message = "; ".join(f"{f}: {m}" if o == res.outcome else f"{f}: {o}: {m}" for f, o, m in bad)
        if len(bad) > 1:
            res.message = f"{len(bad)} of {len(runs)} case families: " + res.message
    elif res.outcome == "skipped":
        reasons = list(dict.fromkeys(m for _, _, m, _ in runs))
        res.message = "; ".join(reasons)
    res.notes = notes
    res.take_measurements(measurements)  # numbers to measurements, reproducer paths to reproducers, the rest details


def family_counts(outcome: str, message: str, ctx: CheckContext) -> Family:
    """One family's entry in ``Result.families``."""
    return Family(Outcome(outcome), ctx.cases_run, ctx.cases_skipped_total, dict(sorted(ctx.skip_reasons.items())),
                  message if outcome != "passed" else "")


def run_clause(clause: Clause, impl: Implementation, device: str = "cpu", seed: int = 0, *,
               budget: Budget | None = None, report_dir: str | None = None, target: str | None = None) -> Result:
    """Run one clause's check against one implementation, in this process (one run per case family).
    ``target``: the string ``impl`` was loaded from (``CheckContext.target``)."""
    res = Result(clause=clause.id, implementation=impl.name, outcome="passed", level=clause.level, device=device)
    applies = _applicability(clause, declared(impl), device, impl.name)
    if applies.reason:
        res.outcome, res.message = "skipped", applies.reason
        return res
    fams: list[tuple[str, int] | None] = (
        [None] if clause.area in UNSPLIT_AREAS else [(str(m), b) for m, b in applies.families])
    start = time.perf_counter()
    runs = []
    for fam in fams:
        ctx = CheckContext(impl=impl, clause=clause, device=device, seed=seed, family=fam, budget=budget or Budget(),
                           report_dir=report_dir, target=target)
        outcome, message = _family_verdict(ctx, clause)
        runs.append((family_label(fam) if fam else "all", outcome, message, ctx))
    res.duration_s = time.perf_counter() - start
    _aggregate(res, runs)
    return res
