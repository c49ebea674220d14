"""The base-layer matrix (``cases.BASE_AXES``, ``cases.base_matrix``) and the tier switch that reaches the clauses.

- coverage: the pairwise matrix meets every pair of values that occurs in the valid full product, and its cases
  that exist on every device (the CPU packed layout off) meet every pair of the other axes by themselves;
- validity: no case breaks a rule of ``cases.base_invalid``; the full product is exactly the valid combinations;
- the tier: ``Budget.slow`` (``run --slow``, the worker's ``--slow``, pytest's slow tier) gives the tiered clauses
  the full product, the default gives the covering, and the result records which ran;
- the strategies' opt-in axes and the validity record (``quant_settings``) of the 8-bit state.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.clauses import cases, strategies
from conformance.clauses.budget import Budget
from conformance.clauses.clause import Clause, get, select
from conformance.clauses.context import CheckContext
from conformance.harness import runner, worker
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate

KINDS = [(bits, merges) for bits in cases.BASE_AXES for merges in (False, True)]


def _combo(bits: int, case: cases.BaseCase) -> dict[str, Any]:
    return {a.name: (case.in_features, case.out_features) if a.name == "shape" else getattr(case, a.name)
            for a in cases.BASE_AXES[bits]}


def _pairs(combos: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    return {(a, repr(c[a]), b, repr(c[b])) for c in combos for a, b in itertools.combinations(sorted(c), 2)}


def _valid_product(bits: int, merges: bool) -> list[dict[str, Any]]:
    axes = cases.BASE_AXES[bits]
    every = [dict(zip((a.name for a in axes), vs)) for vs in itertools.product(*(a.values for a in axes))]
    return [c for c in every if cases.base_invalid(bits, c, merges=merges) is None]


# -- coverage ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bits", "merges"), KINDS)
def test_the_pairwise_matrix_covers_every_pair_of_the_full_product(bits: int, merges: bool) -> None:
    full = _valid_product(bits, merges)
    got = [_combo(bits, c) for c in cases.base_matrix(bits, merges=merges)]
    missing = _pairs(full) - _pairs(got)
    assert not missing, sorted(missing)[:5]
    assert len(got) < len(full) / 5  # a covering, not the product


@pytest.mark.parametrize(("bits", "merges"), KINDS)
def test_the_cases_every_device_builds_cover_every_pair_by_themselves(bits: int, merges: bool) -> None:
    """A split axis (the CPU packed layout) at its first value: the cases a CPU without the layout runs still meet
    every pair of the other axes."""
    split = {a.name: a.values[0] for a in cases.BASE_AXES[bits] if a.split}
    everywhere = [c for c in _valid_product(bits, merges) if all(c[k] == v for k, v in split.items())]
    got = [_combo(bits, c) for c in cases.base_matrix(bits, merges=merges)]
    got = [c for c in got if all(c[k] == v for k, v in split.items())]
    missing = _pairs(everywhere) - _pairs(got)
    assert not missing, sorted(missing)[:5]
    assert all(c.unavailable("cpu") is None or c.cpu_packed for c in cases.base_matrix(bits, merges=merges))


@pytest.mark.parametrize(("bits", "merges"), KINDS)
def test_the_full_product_is_every_valid_combination(bits: int, merges: bool) -> None:
    got = [_combo(bits, c) for c in cases.base_matrix(bits, full=True, merges=merges)]
    want = _valid_product(bits, merges)
    assert len(got) == len(want) and all(c in want for c in got)
    assert len({repr(c) for c in got}) == len(got)


def test_each_value_covers_every_value_and_pinned_holds_an_axis() -> None:
    got = cases.base_matrix(4, strength=1, merges=True, pinned={"cpu_packed": False})
    assert not any(c.cpu_packed for c in got)
    for axis in cases.BASE_AXES[4]:
        if axis.name in ("cpu_packed", "shape", "blocksize"):
            continue  # pinned; and merges rule out the 48-wide shape and blocksize 128 with in_features 64
        assert {getattr(c, axis.name) for c in got} == set(axis.values), axis.name
    assert len(got) <= max(len(a.values) for a in cases.BASE_AXES[4]) + 1
    with pytest.raises(ValueError, match="no such 4-bit axis"):
        cases.base_matrix(4, pinned={"packed": False})
    with pytest.raises(ValueError, match="no base-layer axes for 2-bit"):
        cases.base_matrix(2)


def test_every_family_of_the_hand_lists_is_in_the_default_matrix() -> None:
    """What the hand-picked lists covered: square and non-square both ways, every storage dtype, the packed layout,
    each float quant storage, the 8-bit threshold."""
    four, eight = cases.base_matrix(4), cases.base_matrix(8)
    for m in (four, eight):
        assert {(c.in_features, c.out_features) for c in m} >= {(64, 48), (48, 64), (64, 64)}
        assert {c.weight_dtype for c in m} == {None, *cases.STORAGE_DTYPES}
        assert {c.compute_dtype for c in m} == set(cases.COMPUTE_DTYPES)
    assert {c.quant_storage for c in four} == {None, *cases.QUANT_STORAGES[1:]}
    assert any(c.cpu_packed for c in four) and {c.quant_label for c in four} == {"nf4", "fp4", "nf4-dq", "fp4-dq"}
    assert {c.threshold for c in eight} == set(cases.INT8_THRESHOLDS)


# -- validity ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bits", "merges"), KINDS)
@pytest.mark.parametrize("full", [False, True], ids=["pairwise", "full"])
def test_no_case_breaks_a_validity_rule(bits: int, merges: bool, full: bool) -> None:
    for c in cases.base_matrix(bits, full=full, merges=merges):
        assert cases.base_invalid(bits, _combo(bits, c), merges=merges) is None, c.label
        assert c.cpu_pack_refusal is None, c.label  # bitsandbytes repacks every packed case
        if merges and bits == 4:
            assert strategies.cpu_blocksize_ok(c.in_features, c.blocksize), c.label


def test_the_rules_name_what_they_rule_out() -> None:
    packed = {"shape": (64, 48), "blocksize": 64, "cpu_packed": True}
    assert "out_features 48" in (cases.base_invalid(4, packed) or "")
    straddle = {"shape": (48, 64), "blocksize": 32, "cpu_packed": False}
    assert cases.base_invalid(4, straddle) is None
    assert "in_features 48" in (cases.base_invalid(4, straddle, merges=True) or "")


def test_an_axis_is_a_base_case_field() -> None:
    """A new axis is one line in the table: every axis name is a field of BaseCase (``shape``: the two sizes), and
    its first value is that field's default where the field has a default (so a table line changes no other case)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cases.BaseCase)}
    for bits, axes in cases.BASE_AXES.items():
        for axis in axes:
            if axis.name == "shape":
                continue
            assert axis.name in defaults, (bits, axis.name)
            if axis.split:
                assert axis.values[0] == defaults[axis.name], axis.name


# -- the tier switch --------------------------------------------------------------------------------------------

def _tiered_clause(check: Any, *, tiered: bool = True) -> Clause:
    return Clause(id="TEST-TIERED", level="MUST", text="t", source="s", area="test", tiered=tiered, check=check,
                  methods=frozenset({"lora"}), bits=frozenset({8}))


def _counting(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        for c in ctx.base_matrix(bits):
            with ctx.case(c.label):
                pass


@pytest.mark.parametrize("slow", [False, True], ids=["pairwise", "full"])
def test_the_budget_picks_the_coverage_and_the_result_says_which(slow: bool) -> None:
    res = run_clause(_tiered_clause(_counting), ReferenceImplementation(), budget=Budget(slow=slow))
    assert res.outcome == "passed", res.message
    n = len(cases.base_matrix(8, full=slow))
    assert res.families["lora/8bit"].run == n
    assert res.details["base_matrix"] == ("full product" if slow else "pairwise")
    assert res.details["base_matrix_cases"] == {"8bit": n}


def test_costly_clauses_take_each_value_by_default_and_pairs_in_the_slow_tier() -> None:
    got: dict[bool, int] = {}

    def check(ctx: CheckContext) -> None:
        got[ctx.budget.slow] = len(ctx.base_matrix(8, costly=True))

    for slow in (False, True):
        res = run_clause(_tiered_clause(check), ReferenceImplementation(), budget=Budget(slow=slow))
        assert res.details["base_matrix"] == ("pairwise" if slow else "each value")
    assert got == {False: len(cases.base_matrix(8, strength=1)), True: len(cases.base_matrix(8))}


def test_a_clause_not_declared_tiered_cannot_read_the_matrix() -> None:
    res = run_clause(_tiered_clause(_counting, tiered=False), ReferenceImplementation())
    assert res.outcome == "error" and "not declared tiered=True" in res.message, res.message


def test_the_slow_flag_travels_from_the_run_config_to_the_workers_budget() -> None:
    opts = runner.RunConfig(slow=True).options("reference")
    assert opts.slow and opts.budget().slow
    argv = worker.options_argv(opts)
    assert "--slow" in argv
    import argparse

    p = argparse.ArgumentParser()
    worker.add_options(p)
    assert p.parse_args(argv).slow and not p.parse_args(worker.options_argv(runner.RunConfig().options("x"))).slow
    assert not runner.RunConfig().options("reference").budget().slow


def test_the_slow_tier_gives_tiered_clauses_a_longer_time_limit() -> None:
    tiered, plain = get("FWD-ORACLE", bound=False), get("FWD-LORA-DELTA", bound=False)
    assert runner.RunConfig().limit(tiered) == tiered.timeout_s
    assert runner.RunConfig(slow=True).limit(tiered) == tiered.timeout_s * runner.SLOW_TIER_TIMEOUT_SCALE
    assert runner.RunConfig(slow=True).limit(plain) == plain.timeout_s
    assert runner.RunConfig(slow=True, timeout=5).limit(tiered) == 5


def test_the_cli_slow_flag_reaches_the_run_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from conformance import cli

    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run_and_finish", lambda args, chosen, impls, pythons, config, entries:
                        seen.append(config) or 0)
    for argv, slow in ((["run", "--clauses", "FWD-ORACLE"], False), (["run", "--slow", "--clauses", "FWD-ORACLE"], True)):
        assert cli.main(argv) == 0
        assert seen[-1].slow is slow


def test_pytest_slow_tier_runs_the_tiered_clauses_under_the_slow_budget() -> None:
    from conformance import testing

    tiered = {c.id for c in select() if c.tiered}
    assert {"FWD-ORACLE", "FWD-INIT-IDENTITY", "MERGE-KEEPS-QUANT-SETTINGS", "MOVE-DTYPE", "COMPILE-FORWARD",
            "COMPILE-MERGE-CYCLE"} <= tiered
    slow = list(testing.iter_checks([ReferenceImplementation()], tier="slow"))
    assert {c.id for _, _, c, _ in slow} == tiered
    assert all(tid.endswith("[slow]") and fn.keywords["budget"].slow for tid, fn, _, _ in slow)
    default = list(testing.iter_checks([ReferenceImplementation()], clauses=["FWD-ORACLE"]))
    assert [tid for tid, *_ in default] == ["FWD-ORACLE[reference]"] and not default[0][1].keywords["budget"].slow
    marks = {p.id: [m.name for m in p.marks] for p in testing.params([ReferenceImplementation()],
                                                                      clauses=["FWD-ORACLE"])}
    assert marks == {"FWD-ORACLE[reference]": [], "FWD-ORACLE[reference][slow]": ["slow"]}


def test_a_tiered_clause_records_the_pairwise_tier_in_the_default_run() -> None:
    res = run_clause(get("FWD-INIT-IDENTITY"), ReferenceImplementation())
    assert res.outcome == "passed", res.message
    assert res.details["base_matrix"] == "pairwise"
    fam = res.families["lora/4bit"]
    assert fam.run + fam.skipped == len(cases.base_matrix(4))
    assert res.details["base_matrix_cases"] == {"4bit": len(cases.base_matrix(4)), "8bit": len(cases.base_matrix(8))}


@pytest.mark.slow
def test_a_tiered_clause_runs_the_full_product_in_the_slow_tier() -> None:
    res = run_clause(get("FWD-INIT-IDENTITY"), ReferenceImplementation(), budget=Budget(slow=True))
    assert res.outcome == "passed", res.message
    assert res.details["base_matrix"] == "full product"
    fam = res.families["lora/4bit"]
    assert fam.run + fam.skipped == len(cases.base_matrix(4, full=True))


# -- the strategies' opt-in axes --------------------------------------------------------------------------------

@given(st.data())
@settings(max_examples=40, deadline=None)
def test_base_cases_draw_the_opt_in_axes_only_when_asked(data: st.DataObject) -> None:
    bits = data.draw(st.sampled_from((4, 8)))
    plain = data.draw(strategies.base_cases(bits))
    assert plain.quant_storage is None and plain.threshold == 0.0
    c = data.draw(strategies.base_cases(bits, quant_storages=strategies.base_axis_values(4, "quant_storage"),
                                        thresholds=strategies.base_axis_values(8, "threshold")))
    if bits == 4:
        assert c.quant_storage in strategies.base_axis_values(4, "quant_storage") and c.threshold == 0.0
    else:
        assert c.threshold in cases.INT8_THRESHOLDS and c.quant_storage is None


def test_the_opt_in_draws_reach_every_value() -> None:
    seen: set[Any] = set()

    @given(st.data())
    @settings(max_examples=80, deadline=None, derandomize=True, database=None)
    def draw(data: st.DataObject) -> None:
        bits = data.draw(st.sampled_from((4, 8)))
        c = data.draw(strategies.base_cases(bits, quant_storages=strategies.base_axis_values(4, "quant_storage"),
                                            thresholds=cases.INT8_THRESHOLDS))
        seen.add(("qs", c.quant_storage) if bits == 4 else ("th", c.threshold))

    draw()
    assert seen == {("qs", q) for q in strategies.base_axis_values(4, "quant_storage")} | \
        {("th", t) for t in cases.INT8_THRESHOLDS}
    with pytest.raises(ValueError, match="no 8-bit axis"):
        strategies.base_axis_values(8, "quant_storage")


# -- the validity record ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["state", "weight"])
def test_the_validity_record_reads_the_8bit_state_settings(where: str) -> None:
    layer = qlayers.make_base_layer(64, 48, bits=8, threshold=cases.INT8_THRESHOLD)
    before = qlayers.quant_settings(layer)
    assert before["threshold"] == cases.INT8_THRESHOLD and before["state_has_fp16_weights"] is False
    expected = qvalidate.expected_of(layer, at_merge=True)
    if where == "state":  # a requantization that rebuilt the weight but reset the MatmulLtState's flag
        layer.state.has_fp16_weights = True
    else:
        layer.weight.has_fp16_weights = True
    assert qlayers.quant_settings(layer) != before
    bad = qvalidate.base_problems(layer, expected)
    assert any("has_fp16_weights" in p and ("False -> True" in p or "MatmulLtState" in p) for p in bad), bad


def test_the_validity_record_reads_the_4bit_quant_states_double_quant() -> None:
    layer = qlayers.make_base_layer(64, 48, double_quant=True)
    assert qlayers.quant_settings(layer)["state_double_quant"] is True
    expected = qvalidate.expected_of(layer, at_merge=True)
    before = qlayers.quant_settings(layer)
    layer.weight.quant_state.nested = False  # a requantization without double quant, the weight still claiming it
    assert {k for k, v in qlayers.quant_settings(layer).items() if before[k] != v} == {"state_double_quant"}
    assert any("nested=False" in p for p in qvalidate.base_problems(layer, expected))


def test_merge_keeps_quant_settings_fails_a_merge_that_resets_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mutation of the reference: its 8-bit merge leaves the MatmulLtState claiming fp16 weights."""
    impl = ReferenceImplementation()
    made = impl.create

    def create(base: torch.nn.Module, spec: Any) -> torch.nn.Module:
        layer = made(base, spec)
        merge = layer.merge

        def bad_merge(*a: Any, **k: Any) -> None:
            merge(*a, **k)
            if hasattr(layer.base_layer, "state"):
                layer.base_layer.state.has_fp16_weights = True

        layer.merge = bad_merge
        return layer

    monkeypatch.setattr(impl, "create", create)
    res = run_clause(get("MERGE-KEEPS-QUANT-SETTINGS"), impl)
    assert res.outcome == "failed", res.message
    assert res.families["lora/8bit"].outcome == "failed" and res.families["lora/4bit"].outcome == "passed"
    assert "state_has_fp16_weights" in res.message, res.message


def test_a_case_knows_the_dtype_its_bias_is_built_in() -> None:
    """``BaseCase.bias_dtype`` (what the compile clauses' bitsandbytes known failure keys on) is the built layer's."""
    bases = [c for bits in (4, 8) for c in cases.base_matrix(bits) if c.unavailable() is None]
    assert {c.bias_dtype for c in bases} == {torch.float32, torch.float16, torch.bfloat16}
    for c in bases:
        assert c.build().bias.dtype == c.bias_dtype, c.label
