"""The third-party example (examples/toy_impl): it loads every documented way and clauses run on it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from conformance.harness import loader as implementation
from conformance.harness.execute import run_clause
from conformance.harness.results import applicability
from conformance.spec.clauses import registry

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_impl"
# clauses a plain LoRA-on-Linear4bit should pass, if the registry has them
EXPECTED_TO_PASS = ("LAYER-PROTOCOL-SURFACE", "FWD-INIT-IDENTITY", "FWD-LORA-DELTA", "FWD-ERR-SHAPE")


@pytest.fixture(autouse=True)
def toy_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(TOY))
    yield
    for name in [m for m in sys.modules if m == "toy_lora" or m.startswith("toy_lora.")]:
        del sys.modules[name]


def test_load_module_attr() -> None:
    impl = implementation.load("toy_lora.impl:impl")
    assert impl.name == "toy_lora"
    assert set(impl.capabilities) == {"lora", "4bit"}
    # duck-typed: load() adds methods()/bits() from the capabilities
    assert impl.methods() == frozenset({"lora"}) and impl.bits() == frozenset({4})


def test_load_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(implementation.ENV_VAR, "toy_lora.impl:impl")
    assert implementation.load().name == "toy_lora"


def test_entry_point_declared_in_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point toy_impl/pyproject.toml declares resolves (as if the package were installed)."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((TOY / "pyproject.toml").read_text())
    declared = meta["project"]["entry-points"][implementation.ENTRY_POINT_GROUP]
    eps = {n: metadata.EntryPoint(n, v, implementation.ENTRY_POINT_GROUP) for n, v in declared.items()}
    monkeypatch.setattr(implementation, "_entry_points", lambda: eps)
    assert "toy_lora" in implementation.available()
    assert implementation.load("toy_lora").name == "toy_lora"


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(implementation.ImplementationNotFound, match="reference"):
        implementation.load("no_such_impl")


def test_undeclared_capabilities_are_skipped_not_failed() -> None:
    impl = implementation.load("toy_lora.impl:impl")
    skipped = [c for c in registry().values() if applicability(c, impl, "cpu")]
    if not skipped:
        pytest.skip("no registered clause needs more than LoRA on 4-bit")
    for c in skipped:
        res = run_clause(c, impl)
        assert res.outcome == "skipped" and res.message, f"{c.id}: {res.outcome} {res.message}"


def test_clauses_run_on_the_toy() -> None:
    impl = implementation.load("toy_lora.impl:impl")
    reg = registry()
    chosen = [reg[c] for c in EXPECTED_TO_PASS if c in reg]
    if not chosen:
        pytest.skip(f"none of {EXPECTED_TO_PASS} is registered yet")
    for c in chosen:
        res = run_clause(c, impl)
        assert res.outcome == "passed", f"{c.id} on toy_lora: {res.outcome}: {res.message}"
