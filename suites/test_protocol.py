"""The plug-in protocol: closed capabilities validated at load, per-family outcomes, capability-gated
cases, malformed layers named, xfail entries and the adopter API (conformance.testing)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from conformance.clauses import interface
from conformance.clauses.clause import Clause, get
from conformance.clauses.context import CheckContext
from conformance.clauses.merge.broken import TransposingMerge
from conformance.core import vocabulary
from conformance.harness import loader
from conformance.harness import xfails as xf
from conformance.harness.execute import run_clause
from conformance.harness.results import Result
from conformance.impls.reference import ReferenceImplementation
from conformance.testing import ConformanceFailure, ConformanceWarning, check_implementation

ROOT = Path(__file__).resolve().parents[1]


class _Impl:
    name = "fake"
    capabilities = frozenset({"lora", "oft", "4bit", "8bit"})

    def version(self) -> str:
        return "0"

    def create(self, base_layer, spec):  # noqa: ANN001, ANN201
        raise NotImplementedError


# -- capabilities --------------------------------------------------------------------------------
def test_every_capability_and_method_is_documented() -> None:
    needed = {"unmerge", "safe_merge", "multi_adapter", "mixed_batch", "rslora", "lora_bias", "dropout", "input_cast"}
    assert needed <= {c.value for c in vocabulary.Capability}
    vocabulary.check_complete()
    assert all(vocabulary.DOCS[c] for c in vocabulary.Capability)
    assert all(vocabulary.METHOD_DOCS[m] for m in vocabulary.Method)


def test_unknown_capability_names_the_valid_ones() -> None:
    impl = _Impl()
    impl.capabilities = frozenset({"lora", "4bit", "multi-adapter"})
    with pytest.raises(interface.InvalidImplementation, match="'multi-adapter'.*valid: .*multi_adapter"):
        interface.validate(impl)
    assert issubclass(interface.InvalidImplementation, loader.ImplementationNotFound)  # the CLI's usage error


@pytest.mark.parametrize("key", ["mixed-batch/oft", "mixed_batch/qlora", "mixed_batch"])
def test_unknown_limitations_key_is_refused(key: str) -> None:
    impl = _Impl()
    impl.limitations = {key: "why"}
    with pytest.raises(interface.InvalidImplementation, match="limitations key"):
        interface.validate(impl)


@pytest.mark.e2e
def test_cli_exits_2_on_a_capability_typo(tmp_path: Path) -> None:
    (tmp_path / "typo_impl.py").write_text(
        "class Impl:\n    name = 'typo'\n    capabilities = frozenset({'lora', '4bit', 'multi-adapter'})\n"
        "    def version(self):\n        return '0'\n    def create(self, base, spec):\n        raise NotImplementedError\n"
        "impl = Impl()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "conformance", "run", "--impl", "typo_impl:impl", "--clauses",
                           "FWD-ERR-RANK"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "multi-adapter" in proc.stderr and "multi_adapter" in proc.stderr


def test_loader_reads_the_declaration_without_patching() -> None:
    impl = loader.load("reference")
    before = dict(vars(impl))
    decl = interface.declared(impl)
    assert decl.methods == {"lora", "oft", "dora"} and decl.bits == {4, 8}
    assert "lora" not in decl.capabilities and vars(impl) == before and not hasattr(impl, "bits")
    assert interface.declared(ReferenceImplementation()) == decl
    assert isinstance(impl, interface.Implementation)


def test_a_method_among_capabilities_is_the_old_spelling_of_methods() -> None:
    impl = _Impl()  # capabilities {"lora", "oft", "4bit", "8bit"}, no methods attribute
    decl = interface.validate(impl)
    assert decl.methods == {vocabulary.Method.LORA, vocabulary.Method.OFT}
    assert decl.capabilities == {vocabulary.Capability.BITS4, vocabulary.Capability.BITS8}


@pytest.mark.parametrize("limitations", [{"mixed_batch/oft": "why"}, {"mixed_batch": {"oft": "why"}}])
def test_both_spellings_of_limitations_read_alike(limitations: dict) -> None:
    impl = _Impl()
    impl.capabilities = frozenset({"lora", "oft", "4bit", "mixed_batch"})
    impl.limitations = limitations
    decl = interface.validate(impl)
    assert decl.has("mixed_batch") and decl.has("mixed_batch", "lora") and not decl.has("mixed_batch", "oft")
    assert decl.limitation("mixed_batch", "oft") == "why"


def test_methods_named_both_ways_must_agree() -> None:
    class Narrowed(ReferenceImplementation):  # methods {lora, oft} inherited, capabilities name lora only
        capabilities = frozenset({"lora", "4bit"})

    with pytest.raises(interface.InvalidImplementation, match="declare methods in `methods` only"):
        interface.validate(Narrowed())
    Narrowed.methods = frozenset({"lora"})
    assert interface.validate(Narrowed()).methods == {"lora"}


def test_unknown_method_names_the_valid_ones() -> None:
    impl = _Impl()
    impl.methods = frozenset({"lora", "qlora"})
    with pytest.raises(interface.InvalidImplementation, match="unknown method 'qlora'; valid: lora, oft, dora"):
        interface.validate(impl)


def test_adapter_spec_dtype() -> None:
    import torch

    assert interface.AdapterSpec("lora").torch_dtype is torch.float32
    assert interface.AdapterSpec("lora", dtype="bfloat16").torch_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        _ = interface.AdapterSpec("lora", dtype="float33").torch_dtype


# -- families and aggregation --------------------------------------------------------------------
def _clause(check) -> Clause:  # noqa: ANN001
    return replace(get("FWD-ERR-RANK"), id="TEST-FAMILIES", methods=frozenset({"lora", "oft"}), check=check)


def test_every_failing_and_crashing_family_is_reported() -> None:
    def check(ctx: CheckContext) -> None:
        for method, bits in ctx.cases():
            ctx.measure_max("ratio", 0.5 if bits == 4 else 2.0)
            if (method, bits) == ("lora", 8):
                ctx.fail("lora 8-bit is off")
            if (method, bits) == ("oft", 4):
                raise RuntimeError("oft 4-bit crashed")

    res = run_clause(_clause(check), _Impl())
    assert res.outcome == "failed"
    assert "lora/8bit: lora 8-bit is off" in res.message and "oft/4bit: error: RuntimeError" in res.message
    fams = res.family_texts()
    assert fams["lora/4bit"] == "passed" and fams["oft/8bit"] == "passed"
    assert fams["lora/8bit"].startswith("failed") and fams["oft/4bit"].startswith("error")
    assert res.measurements["ratio"] == 2.0


def test_error_only_when_nothing_failed() -> None:
    def check(ctx: CheckContext) -> None:
        for _, bits in ctx.cases():
            if bits == 8:
                raise KeyError("boom")

    res = run_clause(_clause(check), _Impl())
    assert res.outcome == "error" and res.message.count("KeyError") == 2


def test_a_clause_whose_cases_all_needed_a_capability_is_inconclusive() -> None:
    def check(ctx: CheckContext) -> None:
        for _ in ctx.cases():
            if not ctx.supports({"use_rslora": True}, "rslora case"):
                continue
            ctx.fail("ran a case it should have skipped")

    res = run_clause(_clause(check), _Impl())
    assert res.outcome == "inconclusive" and "no case ran" in res.message and "rslora" in res.message
    assert res.cases_skipped == {"rslora": 4}
    assert {f: (d.run, d.skipped) for f, d in res.families.items()} == {
        f: (0, 1) for f in ("lora/4bit", "lora/8bit", "oft/4bit", "oft/8bit")}


def test_capability_gated_case_is_skipped_inside_a_clause() -> None:
    impl = ReferenceImplementation()
    impl.capabilities = ReferenceImplementation.capabilities - {"rslora"}
    res = run_clause(get("FWD-LORA-DELTA"), impl)
    assert res.outcome == "passed", res.message
    assert res.cases_skipped["rslora"] > 0
    assert any("rslora" in n for n in res.notes)


def test_clause_needing_an_undeclared_operation_is_skipped() -> None:
    impl = ReferenceImplementation()
    impl.capabilities = ReferenceImplementation.capabilities - {"unmerge"}
    res = run_clause(get("MERGE-ROUNDTRIP"), impl)
    assert res.outcome == "skipped" and "unmerge" in res.message


# -- a malformed layer is a failure that says what is wrong --------------------------------------


def test_malformed_merged_layer_fails_naming_the_shape() -> None:
    res = run_clause(get("MERGE-FORWARD-BOUND"), TransposingMerge())
    assert res.outcome == "failed", res.message
    assert "merged base weight is" in res.message and "expected" in res.message


# -- xfail entries ---------------------------------------------------------------------------------
def _r(outcome: str, clause: str = "MERGE-MULTI") -> Result:
    return Result(clause=clause, implementation="peft", outcome=outcome)  # type: ignore[arg-type]


def test_xfail_covers_failed_and_inconclusive_and_error_only_when_marked() -> None:
    plain, err = xf.parse("MERGE-MULTI peft plain reason\nMERGE-* peft [error] crashes too")
    assert plain.covers("failed") and plain.covers("inconclusive") and not plain.covers("error")
    assert err.covers("error") and err.reason == "crashes too"
    results = [_r("error")]
    xf.apply(results, [plain])
    assert results[0].outcome == "error"
    results = [_r("error")]
    xf.apply(results, [err])
    assert results[0].outcome == "xfailed"


def test_xfail_unknown_clause_is_a_usage_error(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("MERGE-MULTY peft typo\n")
    with pytest.raises(xf.XfailFileError, match=r"x.txt:1: unknown clause 'MERGE-MULTY'.*MERGE-MULTI"):
        xf.load(p)
    with pytest.raises(xf.XfailFileError, match="unknown marker"):
        xf.parse("MERGE-MULTI peft [errors] typo")


def test_xfail_unmatched_entry_is_warned_and_xpass_is_strict_unless_relaxed() -> None:
    entries = xf.parse("MERGE-MULTI peft a\nMERGE-SUBSET peft b\nFWD-ORACLE peft [non-strict] cpu only\n"
                       "OFT-BLOCK-SHARE peft not selected in this run\nFWD-ERR-RANK toy typo'd implementation")
    other = Result(clause="MERGE-SUBSET", implementation="reference", outcome="passed")
    results = [_r("passed"), _r("passed", "FWD-ORACLE"), other]
    unmatched = xf.apply(results, entries)
    assert [r.outcome for r in results] == ["xpassed", "passed", "passed"]
    assert "not reproduced here" in results[1].message
    assert len(unmatched) == 2, unmatched
    assert "MERGE-SUBSET peft' matched no result" in unmatched[0] and "'FWD-ERR-RANK toy' names no" in unmatched[1]
    relaxed = [_r("passed")]
    xf.apply(relaxed, entries, strict=False)
    assert relaxed[0].outcome == "passed"


@pytest.mark.parametrize("path", sorted((ROOT / "xfails").glob("*.txt")), ids=lambda p: p.name)
def test_shipped_xfail_lists_name_known_clauses(path: Path) -> None:
    assert xf.load(path)


# -- the adopter API -------------------------------------------------------------------------------
def test_check_implementation_in_process_and_on_fail_modes() -> None:
    impl = TransposingMerge()
    with pytest.raises(ConformanceFailure, match="MERGE-FORWARD-BOUND") as info:
        check_implementation(impl, clauses=["MERGE-FORWARD-BOUND", "FWD-ERR-RANK"])
    assert {r.clause: r.outcome for r in info.value.results}["FWD-ERR-RANK"] == "passed"
    with pytest.warns(ConformanceWarning, match="MERGE-FORWARD-BOUND"):
        check_implementation(impl, clauses=["MERGE-FORWARD-BOUND"], on_fail="warn")
    got = check_implementation(impl, clauses=["MERGE-FORWARD-BOUND"], on_fail=None,
                               expected_failed_checks=lambda i: {"MERGE-FORWARD-BOUND": f"{i.name} transposes"})
    assert got[0].outcome == "xfailed" and "transposes" in got[0].message


def test_check_implementation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="on_fail"):
        check_implementation(ReferenceImplementation(), on_fail="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown clause"):
        check_implementation(ReferenceImplementation(), clauses=["FWD-ERR-RANK"],
                             expected_failed_checks={"NO-SUCH": "x"})


def test_check_implementation_expected_failure_that_passes_raises() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConformanceFailure, match="xpassed"):
            check_implementation(ReferenceImplementation(), clauses=["FWD-ERR-RANK"],
                                 expected_failed_checks={"FWD-ERR-RANK": "not really"})


@pytest.mark.e2e
def test_check_implementation_by_name_runs_in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name runs in worker processes, loaded once (one fork server describes it and runs the clauses)."""
    from conformance.harness import processes

    started = []
    start = processes.start
    monkeypatch.setattr(processes, "start", lambda opts, *a, **kw: started.append(opts.impl) or start(opts, *a, **kw))
    results = check_implementation("reference", clauses=["FWD-ERR-RANK", "MERGE-TWICE-TEXT"])
    assert [r.outcome for r in results] == ["passed", "passed"]
    assert [r.implementation for r in results] == ["reference", "reference"]
    assert started == ["reference"], f"loaded {len(started)} times: {started}"


def test_exit_status_counts_xpassed_like_pytest_strict() -> None:
    from conformance.harness.results import exit_status

    assert exit_status([_r("xfailed"), _r("passed")]) == 0
    assert exit_status([_r("xpassed")]) == 1
    should = _r("failed")
    should.level = "SHOULD"
    assert exit_status([should]) == 0


class _NoInputCast(ReferenceImplementation):
    """The reference declaring no input cast: its adapters are built in the base's compute dtype and a case
    feeding another dtype is left out (even where a check catches exceptions broadly)."""

    name = "no-input-cast"
    methods = frozenset({"lora"})  # OFT in fp16: no CPU LU
    capabilities = ReferenceImplementation.capabilities - {"input_cast"}


def test_undeclared_input_cast_skips_cases_never_fails() -> None:
    res = run_clause(get("BACKPROP-NOGRAD-FORWARD"), _NoInputCast())
    assert res.outcome == "passed", res.message
    assert res.cases_skipped["input_cast"] > 0
    fam = res.families["lora/8bit"]  # the fp16-input cases are skipped, the family's other cases run
    assert fam.run > 0 and fam.skipped > 0, fam
    assert fam.skip_reasons == {"input_cast not declared": fam.skipped}, fam
