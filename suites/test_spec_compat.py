"""The old ``conformance.spec`` paths still import (user code, README examples and every stored reproducer script
were written against them), are the new modules under their old names, and warn once naming the new path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the scripts the stateful machine wrote (the others in that folder are plain torch + bitsandbytes or litgpt)
REPRODUCERS = sorted((ROOT / "baselines" / "conformance" / "reproducers").glob("reproduce_*.py"))


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", code], capture_output=True,
                          text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "BITSANDBYTES_NOWELCOME": "1",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})


OLD_NEW = [
    ("conformance.spec.interface", "conformance.clauses.interface"),
    ("conformance.spec.clauses", "conformance.clauses.clause"),
    ("conformance.spec.cases", "conformance.clauses.cases"),
    ("conformance.spec.stateful.reproducer", "conformance.clauses.stateful.reproducer"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("old,new", OLD_NEW, ids=[o for o, _ in OLD_NEW])
def test_old_module_is_the_new_one_and_warns_once(old: str, new: str) -> None:
    out = _python(f"import importlib, sys\nimport {old}, {new}\nassert sys.modules[{old!r}] is sys.modules[{new!r}]\n"
                  f"importlib.import_module({old!r})\n")  # a second import: no second warning
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if f"{old} is deprecated" in ln]
    assert len(lines) == 1, out.stderr[-2000:]
    assert f"import {new} instead" in lines[0]


def test_old_package_names_are_the_new_objects() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import conformance.clauses as new
        import conformance.spec as old
        from conformance.spec.interface import AdapterSpec
    assert old.registry is new.registry and old.AdapterSpec is new.AdapterSpec is AdapterSpec


def test_there_are_stored_reproducers() -> None:
    """meta: the test below must have scripts to read."""
    assert len(REPRODUCERS) >= 3


@pytest.mark.e2e
@pytest.mark.parametrize("script", REPRODUCERS, ids=[p.stem for p in REPRODUCERS])
def test_stored_reproducer_imports_still_resolve(script: Path) -> None:
    """Every ``from conformance... import name`` of a stored script runs (not the replay itself: that needs peft and
    minutes); the old stateful path warns with the new one."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    stmts = [ast.unparse(n) for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
        "conformance")]
    assert any("conformance.spec" in s for s in stmts), stmts
    out = _python("\n".join(stmts) + "\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "import conformance.clauses.stateful.reproducer instead" in out.stderr
