"""The closed vocabulary (``conformance.core.vocabulary``) and the one applicability decision.

A method or capability name written anywhere in the package is one of the closed set: the declarations
fail at import (``declare(requires=...)``, a stateful ``Op(needs=...)``), a call such as
``ctx.has("...")`` fails when it runs, and the static scan below finds a misspelling before either, in
every module (a scan of a planted misspelling shows it can fail).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conformance.core import vocabulary
from conformance.core.applicability import applicability
from conformance.core.clause import Clause
from conformance.core.vocabulary import Capability, Declaration, Method, UnknownName

PKG = Path(__file__).resolve().parents[1] / "conformance"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: calls whose first string argument is a capability name (methods of these receivers, or bare functions)
CAPABILITY_CALLS = {"has", "require", "require_case", "skip_case", "capability", "limitation"}
RECEIVERS = {"ctx", "self", "d", "decl", "declaration", "vocabulary", "driver"}
#: keyword arguments holding capability names: a clause's ``requires``, a stateful ``Op``'s ``needs``
CAPABILITY_KEYWORDS = {"requires": None, "needs": "Op"}
METHOD_KEYWORDS = {"methods"}
#: names (variables, attributes) that hold a method: a string compared with one is a method name
METHOD_NAMES = {"method", "m"}


def _strings(node: ast.AST) -> list[ast.Constant]:
    """String constants of ``node``: itself, or the elements of a literal tuple/list/set (also in a call
    such as ``frozenset({...})``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if isinstance(node, ast.Call) and _name(node.func) in ("frozenset", "set", "tuple", "list") and node.args:
        return _strings(node.args[0])
    return []


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def scan(source: str, where: str = "<string>") -> list[str]:
    """Every capability or method string in ``source`` that is not in the closed set, as ``where:line: ...``."""
    caps = {c.value for c in Capability}
    meths = {m.value for m in Method}
    bad: list[str] = []

    def expect(nodes: list[ast.Constant], valid: set[str], what: str) -> None:
        bad.extend(f"{where}:{n.lineno}: unknown {what} {n.value!r}" for n in nodes if n.value not in valid)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            fn = _name(node.func)
            receiver = _name(node.func.value) if isinstance(node.func, ast.Attribute) else None
            if fn in CAPABILITY_CALLS and node.args and (receiver is None or receiver in RECEIVERS):
                expect(_strings(node.args[0]), caps, "capability")
            if fn == "method" and node.args:
                expect(_strings(node.args[0]), meths, "method")
            if fn in ("Capability",) and node.args:
                expect(_strings(node.args[0]), caps, "capability")
            if fn in ("Method", "AdapterSpec") and node.args:
                expect(_strings(node.args[0]), meths, "method")
            if fn == "make_layer" and len(node.args) > 1:
                expect(_strings(node.args[1]), meths, "method")
            for kw in node.keywords:
                if kw.arg in CAPABILITY_KEYWORDS and CAPABILITY_KEYWORDS[kw.arg] in (None, fn):
                    expect(_strings(kw.value), caps, "capability")
                elif kw.arg in METHOD_KEYWORDS or (kw.arg == "method" and fn in ("AdapterSpec", "make_layer")):
                    expect(_strings(kw.value), meths, "method")
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            left, right = node.left, node.comparators[0]
            for var, lit in ((left, right), (right, left)):
                if _name(var) in METHOD_NAMES:
                    expect(_strings(lit), meths, "method")
    return bad


def _sources() -> list[Path]:
    return sorted([*PKG.rglob("*.py"), *EXAMPLES.rglob("*.py")])


def test_no_unknown_capability_or_method_anywhere_in_the_package() -> None:
    bad = [b for p in _sources() for b in scan(p.read_text(encoding="utf-8"), str(p.relative_to(PKG.parent)))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, found", [
    ('ctx.has("multi-adapter")', "unknown capability 'multi-adapter'"),
    ('ctx.require_case("unmerged", label)', "unknown capability 'unmerged'"),
    ('declare("X-Y", "MUST", "t", source="s", area="a", requires=["safe-merge"])', "unknown capability 'safe-merge'"),
    ('Op("x", 1, f, g, h, needs=("mixed_batches",))', "unknown capability 'mixed_batches'"),
    ('if method == "lroa": pass', "unknown method 'lroa'"),
    ('AdapterSpec("qlora")', "unknown method 'qlora'"),
    ('ctx.make_layer(base, "Lora")', "unknown method 'Lora'"),
])
def test_the_scan_finds_a_planted_misspelling(source: str, found: str) -> None:
    got = scan(source)
    assert len(got) == 1 and found in got[0], got


def test_the_scan_passes_correct_names() -> None:
    assert scan('ctx.has("multi_adapter"); ctx.make_layer(b, "oft"); m == "lora"; '
                'declare("X-Y", "MUST", "t", source="s", area="a", requires=["unmerge"], methods=["lora"])') == []


def test_declare_refuses_a_misspelled_requirement_at_import() -> None:
    from conformance.clauses.clause import declare

    with pytest.raises(ValueError, match="unknown capability 'safe-merge'; valid: .*safe_merge"):
        declare("VOCAB-TYPO", "MUST", "t", source="s", area="a", requires=["safe-merge"])
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        declare("VOCAB-TYPO", "MUST", "t", source="s", area="a", methods=["qlora"])


def test_a_stateful_op_refuses_a_misspelled_need() -> None:
    from conformance.clauses.stateful.ops import Op

    with pytest.raises(UnknownName, match="unknown capability 'mixed_batches'"):
        Op("x", 1, lambda d, a: None, lambda data, d: {}, str, needs=("mixed_batches",))


def test_every_name_is_documented() -> None:
    vocabulary.check_complete()
    assert set(vocabulary.LAYER_API) <= set(Capability)
    assert set(vocabulary.PARAM_CAPABILITIES.values()) <= set(Capability)


@pytest.mark.parametrize("params, needs", [
    ({"use_rslora": True}, ["rslora"]), ({"use_rslora": False}, []), ({"lora_bias": True}, ["lora_bias"]),
    ({"lora_dropout": 0.0}, []), ({"lora_dropout": 0.1}, ["dropout"]), ({"module_dropout": 0.5}, ["dropout"]),
    ({"r": 4, "lora_alpha": 8.0}, []),
])
def test_params_needing(params: dict, needs: list[str]) -> None:
    assert [str(c) for _, c in vocabulary.params_needing(params)] == needs


def test_members_read_as_their_strings() -> None:
    assert Method.LORA == "lora" and f"{Method.OFT}" == "oft" and str(Capability.BITS4) == "4bit"
    assert sorted([Method.OFT, Method.LORA]) == ["lora", "oft"]


# -- the one applicability decision ---------------------------------------------------------------------

def _clause(**kw: object) -> Clause:
    return Clause(id="X-Y", level="MUST", text="t", source="s", **kw)  # type: ignore[arg-type]


def _decl(methods: set[str], caps: set[str], limitations: dict | None = None) -> Declaration:
    class Impl:
        pass

    impl = Impl()
    impl.methods, impl.capabilities, impl.limitations = methods, caps, limitations or {}  # type: ignore[attr-defined]
    return Declaration.of(impl)


def test_applicability_reasons_in_order() -> None:
    full = _decl({"lora", "oft"}, {"4bit", "8bit", "unmerge"})
    assert applicability(_clause(devices=frozenset({"cuda"})), full, "cpu", "x").reason == \
        "clause applies to devices ['cuda'], not cpu"
    assert applicability(_clause(), full, "cuda", "x").reason == "x does not declare capability cuda"
    assert applicability(_clause(methods=frozenset({Method.OFT})), _decl({"lora"}, {"4bit"}), "cpu", "x").reason \
        == "x implements none of ['oft']"
    assert applicability(_clause(bits=frozenset({8})), _decl({"lora"}, {"4bit"}), "cpu", "x").reason == \
        "x supports none of the bit widths [8]"
    need = _clause(requires=frozenset({Capability.SAFE_MERGE, Capability.DROPOUT}))
    assert applicability(need, full, "cpu", "x").reason == "x does not declare capability dropout, safe_merge"
    ok = applicability(_clause(), full, "cpu", "x")
    assert ok.reason is None and ok.families == (("lora", 4), ("lora", 8), ("oft", 4), ("oft", 8))


def test_a_limitation_leaves_its_method_out_with_the_reason() -> None:
    decl = _decl({"lora", "oft"}, {"4bit", "mixed_batch"}, {"mixed_batch": {"oft": "no adapter_names"}})
    got = applicability(_clause(requires=frozenset({Capability.MIXED_BATCH})), decl, "cpu", "x")
    assert got.reason is None and got.families == (("lora", 4), ("oft", 4))
    assert got.excluded == {Method.OFT: (Capability.MIXED_BATCH, "no adapter_names")}
    assert applicability(_clause(), decl, "cpu", "x").excluded == {}


def test_the_catalog_order_does_not_depend_on_import_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declarations are recorded as their modules are imported; a check module imported early (by a test, a
    worker) used to reorder the listing and ``docs/clauses.md``. The catalog is area by area whatever happened."""
    from conformance.clauses import clause

    listed = list(clause.catalog())
    monkeypatch.setattr(clause, "_CATALOG", dict(reversed(list(clause._CATALOG.items()))))
    again = list(clause.catalog())
    rank = {a: i for i, a in enumerate(clause.areas())}
    areas = [clause.catalog()[c].area for c in again]
    assert areas == sorted(areas, key=rank.__getitem__)
    # within an area, the (here reversed) declaration order is kept: the order is the areas', nothing else
    assert [c for c in again if clause.catalog()[c].area == "merge"] == \
        [c for c in reversed(listed) if clause.catalog()[c].area == "merge"]
