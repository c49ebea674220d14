"""Cases inside a case family: a skipped case is skipped alone, a failing case never hides a later one, the
counts per family are reported, and an exception is attributed at the protocol boundary (the implementation's
failure, an ``ImplementationUnsupported`` skip, or the suite's own error). In-process, with broken twins of the
reference (``conformance.clauses.faults``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conformance.clauses import cases
from conformance.clauses import faults as broken_impls
from conformance.clauses.clause import Clause, get
from conformance.clauses.context import CheckContext
from conformance.clauses.interface import ImplementationUnsupported
from conformance.harness import report
from conformance.harness.execute import run_clause
from conformance.harness.results import Result
from conformance.impls.reference import ReferenceImplementation

pytestmark = pytest.mark.filterwarnings("ignore")


def _clause(check, **kw) -> Clause:  # noqa: ANN001
    return replace(get("FWD-ERR-RANK"), id="TEST-FAMILIES", check=check, **kw)


class _LoraOnly(ReferenceImplementation):
    name = "lora-only"
    methods = frozenset({"lora"})


class _NoInputCast(ReferenceImplementation):
    """LitGPT's and AdapterHub's situation: no input cast declared."""

    name = "no-input-cast"
    methods = frozenset({"lora"})
    capabilities = ReferenceImplementation.capabilities - {"input_cast"}


# -- skipped cases ------------------------------------------------------------------------------------
def test_an_undeclared_input_cast_skips_those_cases_and_the_family_runs_the_others() -> None:
    res = run_clause(get("FWD-INIT-IDENTITY"), _NoInputCast())
    assert res.outcome == "passed", res.message
    fam = res.families["lora/8bit"]
    assert fam.outcome == "passed" and fam.run > 0 and fam.skipped > 0, fam
    assert fam.skip_reasons == {"input_cast not declared": fam.skipped}
    assert res.families["lora/4bit"].run > 0


def test_a_wrapper_refusing_an_option_is_a_case_skip_never_an_error() -> None:
    res = run_clause(get("FWD-LORA-DELTA"), broken_impls.refuses_rslora)
    assert res.outcome == "passed", res.message
    for fam in res.families.values():
        assert fam.run > 0 and fam.skipped == fam.run, fam  # rslora on and off for every other case
        assert fam.skip_reasons == {"refused by refuses_rslora: this wrapper has no use_rslora": fam.skipped}


def test_a_refusal_inside_a_hypothesis_property_rejects_the_example() -> None:
    def check(ctx: CheckContext) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        @settings(max_examples=20, derandomize=True, database=None, deadline=None)
        @given(st.booleans())
        def prop(refuse: bool) -> None:
            with ctx.case(f"refuse={refuse}", isolate=False):
                if refuse:
                    raise ImplementationUnsupported("no such option")

        prop()

    res = run_clause(_clause(check, methods=frozenset({"lora"}), bits=frozenset({4})), _LoraOnly())
    fam = res.families["lora/4bit"]
    assert res.outcome == "passed" and fam.run > 0 and fam.skipped > 0, fam
    assert set(fam.skip_reasons) == {"refused by lora-only: no such option"}


def test_a_declared_family_that_ran_no_case_is_inconclusive_with_the_reason() -> None:
    def check(ctx: CheckContext) -> None:
        for _ in ctx.cases():
            for r in (2, 4):
                if not ctx.supports({"use_rslora": True}, f"rslora r={r}"):
                    continue
                ctx.fail("ran a case it should have skipped")

    impl = _LoraOnly()
    impl.capabilities = impl.capabilities - {"rslora"}
    res = run_clause(_clause(check, methods=frozenset({"lora"})), impl)
    assert res.outcome == "inconclusive", res.message
    assert "no case ran" in res.message and "rslora not declared: 2" in res.message
    assert res.families["lora/4bit"].to_json() == {"outcome": "inconclusive", "run": 0, "skipped": 2,
                                                   "skip_reasons": {"rslora not declared": 2},
                                                   "message": res.families["lora/4bit"].message}


def test_a_family_skipped_by_a_declared_limitation_stays_skipped() -> None:
    def check(ctx: CheckContext) -> None:
        for method, _ in ctx.cases():
            with ctx.case(method):
                if method == "oft":
                    ctx.skip("oft: a declared limitation")

    res = run_clause(_clause(check, methods=frozenset({"lora", "oft"}), bits=frozenset({4})),
                     ReferenceImplementation())
    assert res.outcome == "passed", res.message
    assert res.families["oft/4bit"].outcome == "skipped" and res.families["lora/4bit"].run == 1


# -- one failure never hides a later one --------------------------------------------------------------
def test_every_failing_case_of_a_family_is_counted_and_the_later_ones_still_run() -> None:
    seen = []

    def check(ctx: CheckContext) -> None:
        for _ in ctx.cases():
            for i in range(5):
                with ctx.case(f"case {i}"):
                    seen.append(i)
                    ctx.check(i % 2 == 1, f"case {i} is off")

    res = run_clause(_clause(check, methods=frozenset({"lora"}), bits=frozenset({4})), _LoraOnly())
    assert seen == [0, 1, 2, 3, 4]
    assert res.outcome == "failed"
    assert res.message.startswith("3 of 5 cases failed: case 0 is off; case 2 is off; case 4 is off"), res.message
    assert res.families["lora/4bit"].run == 5


def test_a_merge_that_breaks_the_base_does_not_hide_the_later_checks_of_its_family() -> None:
    res = run_clause(get("MERGE-KEEPS-QUANT-SETTINGS"), broken_impls.merge_breaks_4bit_base)
    assert res.outcome == "failed"
    fam = res.families["lora/4bit"]
    # each base that exists here (``BaseCase.unavailable``) checked after merge() and after unmerge()
    n = sum(c.unavailable() is None for c in cases.base_matrix(4))
    assert fam.outcome == "failed" and fam.run == 2 * n, fam
    assert f"{2 * n} of {2 * n} cases failed" in fam.message, fam.message
    assert "after merge()" in fam.message and "after unmerge()" in fam.message, fam.message
    assert res.families["lora/8bit"].outcome == "passed" and res.families["oft/8bit"].outcome == "passed"


# -- attribution at the protocol boundary -------------------------------------------------------------
def test_an_exception_out_of_the_implementations_merge_is_its_failure_with_its_frame() -> None:
    res = run_clause(get("MERGE-TWICE-WARNS"), broken_impls.merge_attribute_error)
    assert res.outcome == "failed", res.message
    for fam in res.families.values():
        assert fam.outcome == "failed", fam
        assert "AttributeError" in fam.message and "_merge_plan" in fam.message, fam.message
        assert "raised in the implementation at clauses/faults.py:" in fam.message, fam.message
        assert "in merge, called from merge/checks.py:" in fam.message, fam.message


def test_an_exception_out_of_the_implementations_forward_is_its_failure() -> None:
    res = run_clause(get("FWD-DISABLED"), broken_impls.forward_dtype_mismatch)
    assert res.outcome == "failed", res.message
    for fam in res.families.values():
        assert fam.outcome == "failed" and fam.run == 2, fam  # both cases ran and failed
        assert "RuntimeError" in fam.message and "in forward, called from forward/checks.py:" in fam.message


def test_an_exception_out_of_create_is_the_implementations_failure() -> None:
    res = run_clause(get("FWD-DISABLED"), broken_impls.raises)
    assert res.outcome == "failed", res.message
    assert "RuntimeError: boom from a broken implementation" in res.message
    assert "raised in the implementation at clauses/faults.py:" in res.message
    assert "in create, called from forward/checks.py:" in res.message, res.message


def test_a_missing_protocol_attribute_is_the_implementations_failure() -> None:
    def check(ctx: CheckContext) -> None:
        for method, bits in ctx.cases():
            layer = ctx.make_layer(ctx.make_base(cases.BaseCase(bits)), method, r=4)
            layer.no_such_protocol_attribute  # noqa: B018

    res = run_clause(_clause(check, methods=frozenset({"lora"}), bits=frozenset({4})), _LoraOnly())
    assert res.outcome == "failed", res.message
    assert "AttributeError" in res.message and "no_such_protocol_attribute" in res.message


def test_the_suites_own_exception_is_an_error() -> None:
    def check(ctx: CheckContext) -> None:
        for method, bits in ctx.cases():
            with ctx.case("own bug"):
                layer = ctx.make_layer(ctx.make_base(cases.BaseCase(bits)), method, r=4)
                y = layer(ctx.randn(2, 64))
                torch.zeros(3, 5) @ y  # the suite's own shape bug (its call into torch, not into the layer)

    res = run_clause(_clause(check, methods=frozenset({"lora"}), bits=frozenset({4})), _LoraOnly())
    assert res.outcome == "error", res.message
    assert "RuntimeError" in res.message and "test_families.py" in res.message


# -- the report ---------------------------------------------------------------------------------------
def test_family_counts_round_trip_and_old_reports_load() -> None:
    res = run_clause(get("FWD-INIT-IDENTITY"), _NoInputCast())
    back = Result.from_json(res.to_json())
    assert back.families == res.families and back.families["lora/8bit"].skipped > 0
    assert back.to_json() == res.to_json() and "cases_skipped" not in res.measurements  # a field, not a measurement
    old = {k: v for k, v in res.to_json().items() if k != "families"}
    assert Result.from_json(old).families == {}


def test_markdown_shows_cases_run_and_skipped_per_family() -> None:
    res = run_clause(get("FWD-INIT-IDENTITY"), _NoInputCast())
    fam = res.families["lora/8bit"]
    doc = {"environment": {}, "implementations": {"no-input-cast": {"version": "0"}},
           "clauses": {"FWD-INIT-IDENTITY": {"level": "MUST", "text": ""}}, "results": [res.to_json()],
           "summary": {"implementations": {}}}
    text = report.markdown(doc)
    assert "## Cases per family" in text
    assert (f"lora/8bit {fam.run} run, {fam.skipped} skipped (input_cast not declared: "
            f"{fam.skipped})") in text, text
