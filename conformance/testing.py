"""pytest API for adopters (scikit-learn ``parametrize_with_checks`` style).

    from conformance.testing import parametrize_with_checks

    @parametrize_with_checks(["reference", "my_pkg.adapters:impl"])
    def test_conformance(check):
        check()

yields one test per clause and implementation, with the clause ID in the test id; a failed
clause fails the test with the check's message, a skipped one skips with its reason, an xfail
entry (``xfails=``) turns into ``pytest.xfail`` / a strict xpass failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from conformance.harness import xfails as xf
from conformance.harness.execute import run_clause
from conformance.harness.loader import load
from conformance.spec.interface import Implementation

from .spec.clauses import Clause, select


def check_clause(clause: Clause, impl: Implementation, device: str = "cpu", entries: Sequence[xf.Xfail] = ()) -> None:
    """Run one clause as a pytest test body."""
    import pytest

    res = run_clause(clause, impl, device)
    entry = xf.find(list(entries), clause.id, impl.name)
    if res.outcome == "skipped":
        pytest.skip(res.message)
    if entry is not None:
        if res.outcome in ("failed", "error"):
            pytest.xfail(f"{entry.reason}: {res.message}")
        pytest.fail(f"XPASS: {clause.id} passed for {impl.name} although listed as xfail ({entry.reason})")
    if res.outcome in ("failed", "error"):
        prefix = "" if res.outcome == "failed" else "error while checking: "
        extra = f"\nmeasurements: {res.measurements}" if res.measurements else ""
        pytest.fail(f"{clause.id} ({clause.level}): {clause.text}\n{prefix}{res.message}{extra}", pytrace=False)


def iter_checks(
    impls: Iterable[str | Implementation], clauses: Sequence[str] | None = None, device: str = "cpu",
    xfails: str | None = None, include_slow: bool = True,
) -> Iterable[tuple[str, Callable[[], None], Clause, Implementation]]:
    """(test id, zero-argument check, clause, implementation) for every clause x implementation."""
    entries = xf.load(xfails) if xfails else []
    resolved = [load(i) if isinstance(i, str) else i for i in impls]
    for impl in resolved:
        for c in select(clauses, include_slow=include_slow):
            yield f"{c.id}[{impl.name}]", partial(check_clause, c, impl, device, entries), c, impl


def parametrize_with_checks(impls: Iterable[str | Implementation], **kwargs: Any) -> Any:
    """A ``pytest.mark.parametrize`` over ``check`` callables, one per clause and implementation."""
    import pytest

    items = list(iter_checks(impls, **kwargs))
    params = [pytest.param(fn, id=tid, marks=[pytest.mark.slow] if c.slow else []) for tid, fn, c, _ in items]
    return pytest.mark.parametrize("check", params)
