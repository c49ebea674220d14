"""The third-party example (examples/toy_impl): it loads every documented way and clauses run on it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from conformance.clauses import interface
from conformance.clauses.clause import registry
from conformance.harness import loader as implementation
from conformance.harness.execute import run_clause
from conformance.harness.results import applicability

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_impl"
MERGE_ONLY = Path(__file__).resolve().parents[1] / "examples" / "merge_only"
# clauses a plain LoRA-on-Linear4bit should pass, if the registry has them
EXPECTED_TO_PASS = ("LAYER-PROTOCOL-SURFACE", "FWD-INIT-IDENTITY", "FWD-LORA-DELTA", "FWD-ERR-SHAPE")


@pytest.fixture(autouse=True)
def toy_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(TOY))
    monkeypatch.syspath_prepend(str(MERGE_ONLY))
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("toy_lora", "merge_only_lora")]:
        del sys.modules[name]


def test_load_module_attr() -> None:
    impl = implementation.load("toy_lora.impl:impl")
    assert impl.name == "toy_lora"
    assert set(impl.capabilities) == {"4bit", "unmerge", "safe_merge", "rslora", "dropout", "input_cast"}
    # duck-typed: the harness reads the declaration (bit widths from the capabilities), nothing is patched on
    decl = interface.declared(impl)
    assert decl.methods == frozenset({"lora"}) and decl.bits == frozenset({4})
    assert not hasattr(impl, "bits") and not hasattr(impl, "declaration")


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


# -- the merge-only example: optional features it does not declare are skipped, never failed --------
#: what it lacks, and a clause that needs each (all must be skipped with the capability named)
LACKS = {"unmerge": "MERGE-ROUNDTRIP", "safe_merge": "SAFE-MERGE-NONFINITE", "multi_adapter": "MERGE-MULTI",
         "mixed_batch": "FWD-MIXED-BATCH", "lora_bias": "MERGE-LORA-BIAS", "oft": "OFT-CAYLEY-EXACT"}
#: clauses it has what it takes for (rsLoRA cases inside FWD-LORA-DELTA / MERGE-FORWARD-BOUND are skipped)
MERGE_ONLY_PASSES = ("LAYER-PROTOCOL-SURFACE", "FWD-LORA-DELTA", "FWD-ERR-RANK", "MERGE-FORWARD-BOUND",
                     "MERGE-WARNS-LORA", "MERGE-TWICE-WARNS", "MERGE-KEEPS-QUANT-SETTINGS")


def test_merge_only_skips_what_it_does_not_declare() -> None:
    impl = implementation.load("merge_only_lora.impl:impl")
    reg = registry()
    for cap, cid in LACKS.items():
        res = run_clause(reg[cid], impl)
        assert res.outcome == "skipped" and cap in res.message, f"{cid}: {res.outcome}: {res.message}"


def test_merge_only_passes_what_it_has_with_gated_cases_skipped() -> None:
    impl = implementation.load("merge_only_lora.impl:impl")
    reg = registry()
    for cid in MERGE_ONLY_PASSES:
        res = run_clause(reg[cid], impl)
        assert res.outcome == "passed", f"{cid}: {res.outcome}: {res.message}"
        if cid in ("FWD-LORA-DELTA", "MERGE-FORWARD-BOUND"):
            assert res.cases_skipped.get("rslora", 0) > 0, res.cases_skipped
            assert set(res.families) == {"lora/4bit", "lora/8bit"}


def test_merge_only_wording_differs_from_peft_only_at_should_level() -> None:
    impl = implementation.load("merge_only_lora.impl:impl")
    reg = registry()
    res = run_clause(reg["MERGE-WARNS-LORA-TEXT"], impl)
    assert res.outcome == "failed" and res.level == "SHOULD"
    assert "lora/4bit" in res.message and "lora/8bit" in res.message


def test_broken_merge_only_fails_the_merge_clauses_in_both_families() -> None:
    impl = implementation.load("merge_only_lora.impl:broken")
    reg = registry()
    res = run_clause(reg["MERGE-FORWARD-BOUND"], impl)
    assert res.outcome == "failed", res.message
    assert "lora/4bit" in res.message and "lora/8bit" in res.message
    for cid in ("FWD-LORA-DELTA", "MERGE-WARNS-LORA"):  # its forward and warnings are right
        assert run_clause(reg[cid], impl).outcome == "passed", cid
