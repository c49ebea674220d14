"""The package's layers hold: the import graph has no forbidden edge and no cycle.

Every ``import`` and ``from ... import`` in ``conformance/`` counts, at module level or inside a
function (a lazy import is still a dependency), except those under ``if TYPE_CHECKING:`` (annotations
only, never executed). Nodes are the top-level parts of the package: ``quant``, ``numerics``,
``reference``, ``clauses``, ``impls``, ``harness``, ``cli``, ``testing``, ``probe``, ``bench``, ``ci``, ...
``core`` (the shared types: ``Outcome``, the exit codes) sits on top: every part may import it, it
imports no other part and nothing outside the standard library.
Two nodes are not folders: ``broken``, the broken twins in ``clauses`` (``conformance.clauses.<area>.broken``,
``conformance.clauses.broken``, ``conformance.clauses.faults``: the reference with a bug, so they sit below
``impls``, and nothing in the package imports them), and ``spec``, the deprecated names of ``clauses`` (it imports
``clauses`` only, and nothing in the package imports it).
A second set of tests imports the light layers in a fresh interpreter and checks what got loaded.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "conformance"

#: the parts of the package besides ``core``
PARTS = {"quant", "numerics", "reference", "clauses", "broken", "spec", "impls", "harness", "cli", "testing", "probe",
         "bench", "ci", "stateful", "tinymodels", "__main__", "docs"}
#: the parts that are not a folder or module of their own (see the module docstring)
VIRTUAL = {"broken"}
#: the shared modules of ``clauses`` that are broken twins (besides each area's ``broken``)
BROKEN_MODULES = {"conformance.clauses.broken", "conformance.clauses.faults"}

#: part -> parts it must never import (directly or lazily)
FORBIDDEN: dict[str, set[str]] = {
    "core": PARTS,
    "quant": {"numerics", "reference", "clauses", "broken", "spec", "impls", "harness", "cli", "testing", "probe", "bench",
              "ci"},
    "numerics": {"reference", "clauses", "broken", "spec", "impls", "harness", "cli", "testing", "probe", "bench", "ci"},
    "reference": {"numerics", "clauses", "broken", "spec", "impls", "harness", "cli", "testing", "probe", "bench", "ci"},
    "clauses": {"broken", "spec", "impls", "harness", "cli", "testing", "probe", "bench", "ci"},
    "broken": {"spec", "harness", "cli", "testing", "probe", "bench", "ci"},
    "spec": PARTS - {"clauses", "spec"},
    "impls": {"broken", "spec", "harness", "cli", "testing", "probe", "bench", "ci"},
    "harness": {"broken", "spec", "cli", "testing", "bench", "ci"},
    "ci": {"broken", "spec", "cli", "testing"},
    **{part: {"broken", "spec"} for part in ("cli", "testing", "probe", "bench", "stateful", "tinymodels", "__main__")},
    # the generated pages of docs/: the torch-free sources only (the catalog, core)
    "docs": {"quant", "numerics", "reference", "broken", "spec", "impls", "harness", "cli", "testing", "probe", "bench",
             "ci"},
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "conformance":
        return None
    if parts[1:2] == ["clauses"] and (".".join(parts[:3]) in BROKEN_MODULES or parts[3:4] == ["broken"]):
        return "broken"
    return parts[1] if len(parts) > 1 else "__init__"


def _is_part(name: str) -> bool:
    return name in VIRTUAL or (PKG / name).exists() or (PKG / f"{name}.py").exists()


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, module: str | None = None, *, type_checking: bool = False) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every runtime import in ``path`` (read as ``module``); with
    ``type_checking`` those under ``if TYPE_CHECKING:`` too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = module or _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            # `from conformance import spec` / `from . import checks` import submodules
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> ['file:line', ...]"""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PKG.rglob("*.py")):
        src = _part(_module_of(path))
        for target, line in imports_of(path):
            if target.split(".")[0] == "suites":
                edges[src]["suites"].append(f"{path.relative_to(PKG.parent)}:{line}")
            dst = _part(target)
            if dst and src and dst != src and dst != "__init__" and _is_part(dst):
                edges[src][dst].append(f"{path.relative_to(PKG.parent)}:{line}")
    return edges


def test_no_forbidden_edge() -> None:
    edges = _graph()
    bad = [f"{src} -> {dst} ({', '.join(where[:3])})" for src, deny in FORBIDDEN.items()
           for dst, where in edges.get(src, {}).items() if dst in deny]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_parts_list_is_complete() -> None:
    """meta: ``core`` is forbidden every other part, so the list of parts must name them all."""
    found = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert found - {"core"} <= PARTS, f"parts missing from PARTS: {sorted(found - {'core'} - PARTS)}"


def test_core_imports_only_the_standard_library() -> None:
    """``conformance.core`` runs under nox's interpreter and the torch-free CLI: stdlib only."""
    bad = []
    for path in sorted((PKG / "core").rglob("*.py")):
        for target, line in imports_of(path):
            top = target.split(".")[0]
            if top == "conformance" and not target.startswith("conformance.core"):
                bad.append(f"{path.name}:{line} {target}")
            elif top not in sys.stdlib_module_names and top not in ("__future__", "conformance"):
                bad.append(f"{path.name}:{line} {target}")
    assert not bad, "conformance.core imports beyond the standard library: " + ", ".join(bad)


def test_package_never_imports_suites() -> None:
    bad = [f"{src}: {', '.join(w[:3])}" for src, d in _graph().items() for dst, w in d.items() if dst == "suites"]
    assert not bad, "the package imports the test suites: " + "; ".join(bad)


def test_no_cycle_between_parts() -> None:
    edges = {src: set(d) - {"suites"} for src, d in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles between parts: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """meta: the parser must not miss the kinds of import the rules are about."""
    f = PKG / "clauses" / "forward" / "checks.py"
    found = {t for t, _ in imports_of(f)}
    assert "conformance.clauses.clause" in found
    src = tmp_path / "x.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import conformance.harness\n"
                   "def f():\n    import conformance.cli\n    from ..impls import peft\n")
    found = {t for t, _ in imports_of(src, module="conformance.clauses.x")}
    assert {"conformance.cli", "conformance.impls", "conformance.impls.peft"} <= found
    assert "conformance.harness" not in found
    assert "conformance.harness" in {t for t, _ in imports_of(src, module="conformance.clauses.x", type_checking=True)}


def test_the_part_reader_sees_the_broken_twins() -> None:
    """meta: the broken twins are their own node, the rest of an area is ``clauses``."""
    assert _part("conformance.clauses.merge.broken") == _part("conformance.clauses.faults") == "broken"
    assert _part("conformance.clauses.merge.checks") == _part("conformance.clauses.context") == "clauses"


def _areas() -> list[Path]:
    return sorted(p for p in (PKG / "clauses").iterdir() if p.is_dir() and (p / "__init__.py").exists())


def test_every_area_is_a_package_with_declare_and_checks() -> None:
    from conformance.clauses.clause import areas

    assert [p.name for p in _areas()] == areas() and len(areas()) >= 10
    missing = [f"{p.name}/{f}" for p in _areas() for f in ("declare.py", "checks.py") if not (p / f).exists()]
    assert not missing, f"areas without their declarations or checks: {missing}"


def test_area_packages_and_declarations_stay_torch_free() -> None:
    """Listing the clauses imports every area's ``__init__`` and ``declare``: the first imports nothing, the second
    only the registry, ``core`` and the standard library (read from the source: a lazy import counts too)."""
    bad = []
    for area in _areas():
        bad += [f"{area.name}/__init__.py:{line} {t}" for t, line in imports_of(area / "__init__.py")]
        for target, line in imports_of(area / "declare.py"):
            top = target.split(".")[0]
            ok = (target.startswith("conformance.clauses.clause") or target == "conformance.clauses"
                  or target.startswith("conformance.core") or (top != "conformance" and top in sys.stdlib_module_names)
                  or top == "__future__")
            if not ok:
                bad.append(f"{area.name}/declare.py:{line} {target}")
    assert not bad, "imports that the torch-free listing would load: " + ", ".join(bad)


def test_clauses_never_import_the_harness_even_for_annotations() -> None:
    """The check API (``CheckContext``) lives in ``clauses``: nothing there names the harness, not even under
    ``TYPE_CHECKING``."""
    bad = [f"{path.relative_to(PKG)}:{line} {t}" for path in sorted((PKG / "clauses").rglob("*.py"))
           for t, line in imports_of(path, type_checking=True) if _part(t) in ("harness", "cli", "testing")]
    assert not bad, "clauses import the harness: " + ", ".join(bad)


LIGHT_IMPORTS = [
    # (statement, modules that must not be loaded after it)
    ("import conformance.reference", ["conformance.harness", "conformance.clauses", "conformance.impls", "transformers",
                                      "peft"]),
    ("import conformance.quant", ["conformance.reference", "conformance.harness", "conformance.clauses", "transformers",
                                  "peft"]),
    ("import conformance", ["torch", "bitsandbytes", "conformance.harness", "conformance.clauses", "conformance.spec"]),
    ("from conformance.clauses.clause import catalog; assert len(catalog()) > 40",
     ["torch", "bitsandbytes", "transformers", "peft", "hypothesis", "conformance.clauses.context",
      "conformance.clauses.merge.checks", "conformance.clauses.merge.broken"]),
    ("import warnings; warnings.simplefilter('ignore'); import conformance.spec.clauses",
     ["torch", "bitsandbytes", "transformers", "peft", "hypothesis"]),
    ("import conformance.harness.report, conformance.harness.results, conformance.harness.xfails",
     ["torch", "bitsandbytes", "transformers", "peft"]),
    ("import conformance.core.outcome", ["torch", "bitsandbytes", "conformance.harness", "conformance.clauses",
                                         "conformance.ci", "conformance.quant"]),
    ("import conformance.core.report, conformance.core.join",
     ["torch", "bitsandbytes", "conformance.harness", "conformance.clauses", "conformance.ci", "conformance.quant"]),
    ("import conformance.ci.matrix_report, conformance.ci.gpu", ["torch", "conformance.harness", "conformance.clauses"]),
    ("from conformance.ci.__main__ import main; main(['joined', '--check'])",
     ["torch", "bitsandbytes", "peft", "conformance.harness", "conformance.clauses"]),
    ("from conformance import docs; docs.clauses_markdown(); docs.vocabulary_tables(); docs.report_format()",
     ["torch", "bitsandbytes", "hypothesis", "conformance.harness", "conformance.impls"]),
]


@pytest.mark.e2e
@pytest.mark.parametrize("stmt,absent", LIGHT_IMPORTS, ids=[s for s, _ in LIGHT_IMPORTS])
def test_light_layers_load_nothing_heavy(stmt: str, absent: list[str]) -> None:
    code = (f"import sys\n{stmt}\n"
            f"bad = [m for m in {absent!r} if m in sys.modules]\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent, env={**os.environ, "BITSANDBYTES_NOWELCOME": "1",
                                              "PYTHONPATH": os.pathsep.join([str(PKG.parent),
                                                                             os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{stmt!r} loaded {out.stdout.strip()}"
