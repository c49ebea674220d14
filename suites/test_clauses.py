"""Every registered clause, once per implementation under test (``--impl``, default reference).

Built with the adopter API (``conformance.testing``, what ``parametrize_with_checks`` uses), so the
project's own run and an adopter's run map outcomes the same way. The clause ID is in the test id:
``pytest suites -k MERGE-`` runs the merge clauses, ``pytest suites --impl peft --xfails
xfails/peft-0.21.txt`` runs them against the installed PEFT with its known failures.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from conformance import testing
from conformance.clauses.distributed.fsdp_checks import CLAUSES as FSDP_CLAUSES
from conformance.core.clause import Clause
from conformance.impls.reference import ReferenceImplementation

#: clause -> the session fixture (suites/conftest.py) holding its CPU run for the reference (a result, or a dict of
#: results by clause), shared with the clause's own tests: the distributed clauses start ranks, run once per session
SHARED = {"DIST-DDP-GRADS-AGREE": "ddp_reference_result",
          **dict.fromkeys(FSDP_CLAUSES, "fsdp_reference_results")}


def _impl_names(config: pytest.Config) -> list[str]:
    return config.getoption("--impl") or [os.environ.get("CONFORMANCE_IMPL") or "reference"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "check" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = config.getoption("--device")
    params = []
    # the default tier, then the slow tier of the tiered clauses (the full base-layer matrix), marked slow
    for tier in ("default", "slow"):
        for tid, fn, clause, impl in testing.iter_checks(_impl_names(config), device=device, tier=tier,
                                                         xfails=config.getoption("--xfails")):
            params.append(_param(tid, fn, clause, impl, device, slow=clause.slow or tier == "slow"))
    metafunc.parametrize(("check", "shared", "clause_id"), params)


#: areas whose clauses share work through the implementation's budget (the state machine's run): run as the
#: implementation's checks, never from the session's reference results
OWN_RUN_AREAS = frozenset({"stateful"})


def _param(tid: str, fn: Any, clause: Clause, impl: Any, device: str, *, slow: bool) -> Any:
    marks = [pytest.mark.slow] if slow else []
    if "distributed" in clause.requires:  # spawned ranks: interpreters started
        marks.append(pytest.mark.e2e)
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    shared = None
    if device == "cpu" and type(impl) is ReferenceImplementation:
        shared = SHARED.get(clause.id)
        if shared is None and not slow and clause.area not in OWN_RUN_AREAS:
            shared = "reference_results"  # the session's run of it, which the area's broken-twin tests judge too
    return pytest.param(fn, shared, clause.id, id=tid, marks=marks)


def test_clause(check, shared: str | None, clause_id: str, request: pytest.FixtureRequest) -> None:  # noqa: ANN001
    """``check``: a zero-argument check from conformance.testing; ``shared``: the fixture with its result, if any
    (``reference_results``: the session's dict of reference results, by clause)."""
    if shared == "reference_results":
        check(result=testing.reference_result(clause_id, request.getfixturevalue(shared)))
    elif shared:
        got = request.getfixturevalue(shared)
        check(result=got[clause_id] if isinstance(got, dict) else got)
    else:
        check()
