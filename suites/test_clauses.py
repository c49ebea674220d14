"""Every registered clause, once per implementation under test (``--impl``, default reference).

Built with the adopter API (``conformance.testing``, what ``parametrize_with_checks`` uses), so the
project's own run and an adopter's run map outcomes the same way. The clause ID is in the test id:
``pytest suites -k MERGE-`` runs the merge clauses, ``pytest suites --impl peft --xfails
xfails/peft-0.21.txt`` runs them against the installed PEFT with its known failures.
"""

from __future__ import annotations

import os

import pytest

from conformance import testing


def _impl_names(config: pytest.Config) -> list[str]:
    return config.getoption("--impl") or [os.environ.get("CONFORMANCE_IMPL") or "reference"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "check" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = config.getoption("--device")
    params = testing.params(_impl_names(config), device=device, xfails=config.getoption("--xfails"))
    if device == "cuda":
        params = [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.gpu]) for p in params]
    metafunc.parametrize("check", params)


def test_clause(check) -> None:  # noqa: ANN001 - a zero-argument check from conformance.testing
    check()
