"""One clause's outcome for one implementation, and running a check in this process."""

from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .clauses import Clause
from .context import CheckContext, ClauseFailure, ClauseSkipped
from .implementation import Implementation

Outcome = Literal["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
OUTCOMES: tuple[Outcome, ...] = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


@dataclass
class Result:
    clause: str
    implementation: str
    outcome: Outcome
    message: str = ""
    duration_s: float = 0.0
    measurements: dict[str, Any] = field(default_factory=dict)
    level: str = "MUST"
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["duration_s"] = round(self.duration_s, 4)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def applicability(clause: Clause, impl: Implementation, device: str) -> str | None:
    """Why the clause does not apply to this implementation/device (None when it does)."""
    if device not in clause.devices:
        return f"clause applies to devices {sorted(clause.devices)}, not {device}"
    if device == "cuda" and "cuda" not in impl.capabilities:
        return f"{impl.name} does not declare capability cuda"
    if not clause.methods & impl.methods():
        return f"{impl.name} implements none of {sorted(clause.methods)}"
    if not clause.bits & impl.bits():
        return f"{impl.name} supports none of the bit widths {sorted(clause.bits)}"
    missing = sorted(clause.requires - set(impl.capabilities))
    if missing:
        return f"{impl.name} does not declare capability {', '.join(missing)}"
    return None


def run_clause(clause: Clause, impl: Implementation, device: str = "cpu", seed: int = 0) -> Result:
    """Run one clause's check against one implementation, in this process."""
    res = Result(clause=clause.id, implementation=impl.name, outcome="passed", level=clause.level, device=device)
    reason = applicability(clause, impl, device)
    if reason:
        res.outcome, res.message = "skipped", reason
        return res
    ctx = CheckContext(impl=impl, clause=clause, device=device, seed=seed)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clause.check(ctx)
    except ClauseSkipped as exc:
        res.outcome, res.message = "skipped", str(exc)
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
