"""Every registered clause, once per implementation under test (``--impl``, default reference).

The clause ID is in the test id: ``pytest suites -k MERGE-`` runs the merge clauses,
``pytest suites --impl peft`` runs them against the installed PEFT.
"""

from __future__ import annotations

import os

import pytest

from conformance.testing import check_clause


def _impl_names(config: pytest.Config) -> list[str]:
    return config.getoption("--impl") or [os.environ.get("CONFORMANCE_IMPL") or "reference"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "clause" not in metafunc.fixturenames:
        return
    from conformance.spec.clauses import registry

    params = []
    for name in _impl_names(metafunc.config):
        for c in registry().values():
            marks = [pytest.mark.slow] if c.slow else []
            if metafunc.config.getoption("--device") == "cuda":
                marks.append(pytest.mark.gpu)
            params.append(pytest.param(c, name, id=f"{c.id}[{name}]", marks=marks))
    metafunc.parametrize(("clause", "impl_name"), params)


_IMPLS: dict[str, object] = {}


def test_clause(clause, impl_name, request: pytest.FixtureRequest) -> None:
    from conformance.harness import xfails as xf
    from conformance.harness.loader import load

    impl = _IMPLS.get(impl_name) or _IMPLS.setdefault(impl_name, load(impl_name))
    path = request.config.getoption("--xfails")
    check_clause(clause, impl, request.config.getoption("--device"), xf.load(path) if path else [])
