"""Running one clause's check in this process."""

from __future__ import annotations

import time
import traceback
import warnings

from conformance.harness.context import CheckContext
from conformance.harness.results import Result, applicability
from conformance.spec.budget import Budget
from conformance.spec.clauses import Clause, ClauseFailure, ClauseInconclusive, ClauseSkipped
from conformance.spec.interface import Implementation


def run_clause(clause: Clause, impl: Implementation, device: str = "cpu", seed: int = 0, *,
               budget: Budget | None = None, report_dir: str | None = None) -> Result:
    """Run one clause's check against one implementation, in this process."""
    res = Result(clause=clause.id, implementation=impl.name, outcome="passed", level=clause.level, device=device)
    reason = applicability(clause, impl, device)
    if reason:
        res.outcome, res.message = "skipped", reason
        return res
    ctx = CheckContext(impl=impl, clause=clause, device=device, seed=seed, budget=budget or Budget(),
                       report_dir=report_dir)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clause.check(ctx)
    except ClauseSkipped as exc:
        res.outcome, res.message = "skipped", str(exc)
    except ClauseInconclusive as exc:
        res.outcome, res.message = "inconclusive", str(exc)
    except (ClauseFailure, AssertionError) as exc:
        res.outcome, res.message = "failed", str(exc) or f"assertion failed in {clause.check.__name__}"
    except Exception as exc:  # an implementation's exception is an outcome, not a crash
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        res.outcome, res.message = "error", f"{type(exc).__name__}: {exc}{where}"
    res.duration_s = time.perf_counter() - start
    res.measurements = dict(ctx.measurements)
    if ctx.notes:
        res.measurements["notes"] = list(ctx.notes)
    return res
