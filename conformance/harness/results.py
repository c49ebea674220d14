"""One clause's outcome for one implementation (torch-free: reports and comparisons use it).

``Result`` is defined in ``conformance.core.report`` (the report's typed records) and imported here."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from conformance.clauses.interface import declared
from conformance.core import outcome as _outcome
from conformance.core.applicability import applicability as _applicability
from conformance.core.outcome import OUTCOMES, Outcome
from conformance.core.report import Result

if TYPE_CHECKING:
    from conformance.clauses.clause import Clause
    from conformance.clauses.interface import Implementation

__all__ = ["OUTCOMES", "Outcome", "Result", "applicability", "exit_status", "nothing_checked"]


def applicability(clause: Clause, impl: Implementation, device: str) -> str | None:
    """Why the clause does not apply to this implementation/device (None when it does):
    ``conformance.core.applicability`` decides."""
    return _applicability(clause, declared(impl), device, impl.name).reason


def exit_status(results: Iterable[Result]) -> int:
    """1 if any MUST clause failed, errored or was inconclusive (xfailed excepted), or any expected failure
    passed (``xpassed``: strict, as under pytest; a non-strict entry leaves it ``passed``); else 3 if for
    some implementation no clause ran (every one skipped: ``nothing_checked`` says why); else 0.
    ``conformance.core.outcome.exit_status`` is the rule."""
    return _outcome.exit_status((r.implementation, r.outcome, r.level) for r in results)


_CAPABILITY = re.compile(r"does not declare capabilit(?:y|ies) ([a-z0-9_]+(?:, [a-z0-9_]+)*)")


def nothing_checked(results: Iterable[Result]) -> dict[str, str]:
    """implementation -> one line saying why nothing was checked, for every implementation whose results
    are all ``skipped``: the count, the capabilities the skip reasons name (what to declare), and the most
    frequent reasons."""
    by_impl: dict[str, list[Result]] = {}
    for r in results:
        by_impl.setdefault(r.implementation, []).append(r)
    out = {}
    for impl, rs in by_impl.items():
        if any(Outcome(r.outcome).ran for r in rs):
            continue
        reasons: dict[str, int] = {}
        caps: dict[str, None] = {}
        for r in rs:
            reasons[r.message or "(no reason given)"] = reasons.get(r.message or "(no reason given)", 0) + 1
            for m in _CAPABILITY.finditer(r.message):
                caps.update(dict.fromkeys(m.group(1).split(", ")))
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        why = "; ".join(f"{reason} ({n})" for reason, n in top) + (" ..." if len(reasons) > 3 else "")
        declare = (f" declare capability {', '.join(caps)} to run them (if {impl} supports it);" if caps else "")
        out[impl] = f"nothing checked for {impl}: all {len(rs)} clauses were skipped;{declare} reasons: {why}"
    return out
