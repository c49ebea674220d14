"""The adopter API (scikit-learn ``check_estimator`` / ``parametrize_with_checks`` style).

Outside pytest::

    from conformance.testing import check_implementation

    results = check_implementation("my_pkg.adapters:impl", on_fail="warn")

In a pytest suite::

    from conformance.testing import parametrize_with_checks

    @parametrize_with_checks(["my_pkg.adapters:impl"], expected_failed_checks={"MERGE-MULTI": "upstream #12"})
    def test_conformance(check):
        check()

yields one test per clause and implementation (the clause ID in the test id). A failed clause fails
the test with the check's message, a skipped one skips with its reason. ``expected_failed_checks``
(``{clause_id: reason}``, or a callable taking the implementation and returning one) turns a failed or
inconclusive clause into an expected failure and a passing one into a strict XPASS failure, by the same
rule as the CLI's ``--xfails`` files (``conformance.harness.xfails.resolve``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

from conformance.clauses.budget import Budget
from conformance.clauses.clause import Clause, catalog, select
from conformance.clauses.interface import Implementation
from conformance.core.outcome import EXIT_NOTHING_CHECKED, Outcome
from conformance.harness import xfails as xf
from conformance.harness.execute import run_clause
from conformance.harness.loader import load
from conformance.harness.results import Result, exit_status, nothing_checked

ExpectedFailed = Mapping[str, str] | Callable[[Implementation], Mapping[str, str] | None] | None
OnFail = Literal["raise", "warn"] | None


class ConformanceFailure(AssertionError):
    """``check_implementation(on_fail="raise")``: a MUST clause failed, errored or was inconclusive, or an
    expected failure passed; ``.results`` holds every result."""

    def __init__(self, message: str, results: list[Result]) -> None:
        super().__init__(message)
        self.results = results


class NothingChecked(ConformanceFailure):
    """``check_implementation(on_fail="raise")``: no clause ran for the implementation (every one was
    skipped: a device or capabilities it does not declare); the message names the capabilities to declare.
    A run in which nothing ran passes nothing (``conformance run`` exits 3)."""


class ConformanceWarning(UserWarning):
    """``check_implementation(on_fail="warn")``: one per clause that did not pass."""


def expected_entries(expected: ExpectedFailed, impl: Implementation) -> list[xf.Xfail]:
    """``expected_failed_checks`` as xfail entries for ``impl`` (an unknown clause ID is a ValueError)."""
    got = expected(impl) if callable(expected) else expected
    if not got:
        return []
    known = catalog()
    unknown = sorted(c for c in got if c not in known)
    if unknown:
        raise ValueError(f"expected_failed_checks names unknown clause(s) {unknown}; see `python -m conformance "
                         "clauses`")
    return [xf.Xfail(cid, "*", reason, 0, source="expected_failed_checks") for cid, reason in got.items()]


def _results_in_process(impl: Implementation, chosen: Sequence[Clause], device: str, slow: bool = False
                        ) -> list[Result]:
    """One result per clause; Ctrl-C raises ``Interrupted`` (a ``KeyboardInterrupt``) carrying those reached."""
    from conformance.harness.runner import Interrupted

    results: list[Result] = []
    budget = Budget(slow=slow)  # one per run: the STATE-* clauses share one machine run (Budget.shared)
    try:
        for c in chosen:
            results.append(run_clause(c, impl, device, budget=budget))
    except KeyboardInterrupt:
        raise Interrupted(results) from None
    return results


def _results_in_workers(target: str, chosen: Sequence[Clause], device: str, slow: bool = False
                        ) -> tuple[Implementation, list[Result]]:
    from conformance.harness import runner

    # loaded once: the fork server that runs the clauses also describes the implementation
    with runner.open_implementation(target, runner.RunConfig(device=device, slow=slow)) as loaded:
        info = loaded.info
        results = loaded.run(chosen, progress=lambda _msg: None)

    class _Described:  # what expected_failed_checks callables and messages see of a worker-run implementation
        name = info.name
        methods = frozenset(info.methods)
        capabilities = frozenset(info.capabilities)

        def version(self) -> str:
            return info.version

        def create(self, base_layer: Any, spec: Any) -> Any:
            raise RuntimeError(f"{info.name} runs in worker processes; load it with conformance.harness.loader")

    return _Described(), results  # type: ignore[return-value]


def check_implementation(
    impl: str | Implementation,
    *,
    clauses: Sequence[str] | None = None,
    device: str = "cpu",
    expected_failed_checks: ExpectedFailed = None,
    on_fail: OnFail = "raise",
    slow: bool = False,
) -> list[Result]:
    """Run the spec against ``impl`` and return one ``Result`` per clause.

    ``impl`` given as a string (built-in name, entry point or ``package.module:attr``) runs in isolated
    worker processes (``conformance.harness.runner``: a crash or hang is an ``error`` result, each worker
    imports the same string again); an object runs in this process. ``clauses`` are glob patterns over
    clause IDs (default all). ``expected_failed_checks``: ``{clause_id: reason}`` or a callable of the
    implementation returning one. ``on_fail``: ``"raise"`` raises ``ConformanceFailure`` when a MUST clause
    failed, errored or was inconclusive, or an expected failure passed, and ``NothingChecked`` (a
    ``ConformanceFailure``) when no clause ran at all (every one skipped); ``"warn"`` emits a
    ``ConformanceWarning`` per clause that did not pass, and one when nothing was checked; ``None`` only
    returns the results. ``slow``: the slow tier (``Budget.slow``: the tiered clauses run the full base-layer
    matrix instead of a covering of every pair; each result records which ran, ``details["base_matrix"]``).
    """
    if on_fail not in ("raise", "warn", None):
        raise ValueError(f"on_fail must be 'raise', 'warn' or None, got {on_fail!r}")
    chosen = select(clauses)
    if not chosen:
        raise ValueError(f"no clause matches {list(clauses or [])}")
    if isinstance(impl, str):
        obj, results = _results_in_workers(impl, chosen, device, slow)
    else:
        from conformance.clauses.interface import validate

        validate(impl)
        obj, results = impl, _results_in_process(impl, chosen, device, slow)
    entries = expected_entries(expected_failed_checks, obj)
    for msg in xf.apply(results, entries):
        warnings.warn(msg, ConformanceWarning, stacklevel=2)
    bad = [r for r in results if Outcome(r.outcome).is_finding]
    status = exit_status(results)
    if on_fail == "warn":
        for r in bad:
            warnings.warn(f"{r.clause} ({r.level}) {r.outcome} for {r.implementation}: {r.message}",
                          ConformanceWarning, stacklevel=2)
        for why in nothing_checked(results).values():
            warnings.warn(why, ConformanceWarning, stacklevel=2)
    elif on_fail == "raise" and status == EXIT_NOTHING_CHECKED:
        raise NothingChecked("; ".join(nothing_checked(results).values()), results)
    elif on_fail == "raise" and status:
        worst = [r for r in bad if Outcome(r.outcome).counts_for_exit(r.level)]
        lines = [f"{r.clause} ({r.level}) {r.outcome}: {r.message[:300]}" for r in worst]
        raise ConformanceFailure(f"{obj.name}: {len(worst)} clause(s) do not conform:\n" + "\n".join(lines), results)
    return results


def restricted(clause_id: str, *methods: str) -> Clause:
    """Clause ``clause_id`` applying to ``methods`` only (a test that runs one method's families of a clause)."""
    import dataclasses

    from conformance.clauses.clause import get

    return dataclasses.replace(get(clause_id), methods=frozenset(methods))


def on_family(clause_id: str, family: str) -> Clause:
    """Clause ``clause_id`` applying to one case family (``"lora/4bit"``: a method and a bit width) only."""
    import dataclasses

    from conformance.clauses.clause import get

    method, _, width = family.partition("/")
    if not width.endswith("bit") or not width[:-3].isdigit():
        raise ValueError(f"a case family is METHOD/<bits>bit (e.g. lora/4bit), got {family!r}")
    clause, bits = get(clause_id), int(width[:-3])
    if method not in clause.methods or bits not in clause.bits:
        raise ValueError(f"{clause_id} has no case family {family}")
    return dataclasses.replace(clause, methods=frozenset({method}), bits=frozenset({bits}))


def check_clause(clause: Clause, impl: Implementation, device: str = "cpu", entries: Sequence[xf.Xfail] = (),
                 strict: bool = True, result: Result | None = None, target: str | None = None,
                 budget: Budget | None = None) -> None:
    """Run one clause as a pytest test body (outcomes mapped as ``xfails.resolve`` says).

    ``result``: this clause's result for ``impl`` on ``device``, already run (a suite sharing one expensive run,
    e.g. a session fixture): judged as is, the clause is not run again. ``target``: the string ``impl`` was
    loaded from (stateful reproducers rebuild it from this). ``budget``: the budget to run it under (the checks
    of one implementation share one, and with it their state-machine run)."""
    import pytest

    res = result if result is not None else run_clause(clause, impl, device, target=target, budget=budget)
    entry = xf.find(list(entries), clause.id, impl.name)
    outcome, message = xf.resolve(res.outcome, res.message, entry, strict=strict)
    if outcome is Outcome.SKIPPED:
        pytest.skip(message)
    if outcome is Outcome.XFAILED:
        pytest.xfail(message)
    if outcome is Outcome.XPASSED:
        pytest.fail(f"XPASS(strict): {clause.id} {message}", pytrace=False)
    if outcome.is_failure:
        prefix = {Outcome.FAILED: "", Outcome.ERROR: "error while checking: ",
                  Outcome.INCONCLUSIVE: "inconclusive: "}[outcome]
        extra = "".join(f"\n{what}: {value}" for what, value in (
            ("measurements", res.measurements), ("details", res.details), ("notes", res.notes),
            ("reproducers", res.reproducers)) if value)
        pytest.fail(f"{clause.id} ({clause.level}): {clause.text}\n{prefix}{message}{extra}", pytrace=False)


def iter_checks(
    impls: Iterable[str | Implementation], *, clauses: Sequence[str] | None = None, device: str = "cpu",
    expected_failed_checks: ExpectedFailed = None, xfails: str | Sequence[str] | None = None,
    xfail_strict: bool = True, include_slow: bool = True, tier: Literal["default", "slow"] = "default",
) -> Iterable[tuple[str, Callable[[], None], Clause, Implementation]]:
    """(test id, zero-argument check, clause, implementation) for every clause x implementation.

    Implementations given by name are loaded in this process (``conformance.harness.loader.load``).
    ``xfails``: xfail file path(s) (the CLI's format), applied besides ``expected_failed_checks``.
    ``tier="slow"``: only the clauses whose slow tier runs other cases (``Clause.tiered``: the full base-layer
    matrix), under the slow budget (``Budget.slow``), their test ids ending in ``[slow]``; mark them slow.
    """
    if tier not in ("default", "slow"):
        raise ValueError(f"tier must be 'default' or 'slow', got {tier!r}")
    paths = [xfails] if isinstance(xfails, str) else list(xfails or [])
    from_files = [e for p in paths for e in xf.load(p)]
    resolved = [(load(i), i) if isinstance(i, str) else (i, None) for i in impls]
    for impl, target in resolved:
        entries = expected_entries(expected_failed_checks, impl) + from_files
        budget = Budget(slow=tier == "slow")  # this implementation's checks share it (and their state-machine run)
        for c in select(clauses, include_slow=include_slow):
            if tier == "slow" and not c.tiered:
                continue
            yield (f"{c.id}[{impl.name}]" + ("[slow]" if tier == "slow" else ""), partial(check_clause, c, impl, device, entries, xfail_strict, target=target,
                                                  budget=budget), c, impl)


def params(impls: Iterable[str | Implementation], **kwargs: Any) -> list[Any]:
    """``pytest.param`` objects (one check callable each) for ``metafunc.parametrize("check", ...)``: the default
    tier, then the slow tier of the tiered clauses (``iter_checks(tier="slow")``), marked slow."""
    import pytest

    return [pytest.param(fn, id=tid, marks=[pytest.mark.slow] if c.slow or tier == "slow" else [])
            for tier in ("default", "slow") for tid, fn, c, _ in iter_checks(impls, tier=tier, **kwargs)]


def parametrize_with_checks(
    impls: Iterable[str | Implementation], *, clauses: Sequence[str] | None = None, device: str = "cpu",
    expected_failed_checks: ExpectedFailed = None, xfail_strict: bool = True,
) -> Any:
    """A ``pytest.mark.parametrize`` over ``check`` callables, one per clause and implementation.

    Implementations run in the pytest process (names are loaded with ``conformance.harness.loader``).
    ``expected_failed_checks``: ``{clause_id: reason}`` or a callable of the implementation returning one;
    a listed clause that fails is xfailed, one that passes fails the test as XPASS unless
    ``xfail_strict=False``.
    """
    import pytest

    return pytest.mark.parametrize("check", params(impls, clauses=clauses, device=device,
                                                    expected_failed_checks=expected_failed_checks,
                                                    xfail_strict=xfail_strict))


def reference_result(clause_id: str, cache: dict[str, Result] | None = None) -> Result:
    """The reference's CPU result of ``clause_id`` in the default tier; with ``cache`` (a test session's dict: the
    suite's fixture ``reference_results``), run once and shared by every test that judges it (``suites/test_clauses.py``
    and the areas' ``broken_twin_tests``)."""
    if cache is not None and clause_id in cache:
        return cache[clause_id]
    from conformance.clauses.clause import get
    from conformance.impls.reference import ReferenceImplementation

    res = run_clause(get(clause_id), ReferenceImplementation())
    if cache is not None:
        cache[clause_id] = res
    return res


def _session_cache(request: Any) -> dict[str, Result] | None:
    """The session's ``reference_results`` fixture where the suite defines one (suites/conftest.py), else None."""
    import pytest

    try:
        return request.getfixturevalue("reference_results")
    except pytest.FixtureLookupError:
        return None


def broken_twin_tests(broken: Mapping[str, Any], areas: Iterable[str]) -> tuple[Callable[..., None], ...]:
    """The suite's own evidence that its clauses can fail: three pytest test functions for a test module to bind at
    top level. Every clause of ``areas`` has a broken twin in ``broken`` (clause ID -> implementation, e.g.
    ``conformance.clauses.broken.twins(areas)``) and nothing else is listed, each clause passes on the reference,
    and each fails (outcome ``failed``, never ``error``) on its twin."""
    import pytest

    from conformance.clauses.clause import get, registry

    areas = frozenset(areas)

    def test_every_clause_of_these_areas_has_a_broken_fixture() -> None:
        mine = {c.id for c in registry().values() if c.area in areas}
        assert mine == set(broken), f"missing: {sorted(mine - set(broken))}, extra: {sorted(set(broken) - mine)}"

    @pytest.mark.parametrize("clause_id", sorted(broken))
    def test_passes_on_reference(clause_id: str, record_property: Callable[[str, object], None],
                                 request: Any) -> None:
        res = reference_result(clause_id, _session_cache(request))
        record_property("measurements", res.measurements)
        # xfailed: every case passed but those bitsandbytes itself fails as xfails/bitsandbytes.ini lists
        assert res.outcome in ("passed", "xfailed"), res.message

    @pytest.mark.parametrize("clause_id", sorted(broken))
    def test_fails_on_broken(clause_id: str) -> None:
        impl = broken[clause_id]
        family = getattr(impl, "shows_on", None)  # a twin whose bug shows on one family: that family alone runs
        res = run_clause(on_family(clause_id, family) if family else get(clause_id), impl)
        assert res.outcome == "failed", f"{impl.name}: {res.outcome}: {res.message}"
        if family:
            assert list(res.families) == [family] and res.families[family].outcome == "failed", res.family_texts()

    return test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference, test_fails_on_broken
