"""Meta tests of the helpers every verdict trusts (array-api-tests keeps such tests in ``meta_tests/``).

- the case builders: ``pairwise`` covers every pair of factor values that occurs in a valid combination, and
  ``with_storage_dtypes`` meets every (compute dtype, storage dtype) pair in every run of nine base cases, as its
  docstring claims;
- ``CheckContext.bounded``, the clauses' one bound test: a ratio above 1, an infinite one and a NaN fail, the worst
  ratio is what the report keeps;
- the family aggregation: a clause's outcome is the worst of its case families' (failed, error, inconclusive,
  passed, skipped), each family counted on its own, whatever the families do.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.clauses.cases import COMPUTE_DTYPES, STORAGE_DTYPES, base_cases, pairwise, with_storage_dtypes
from conformance.clauses.clause import ClauseFailure
from conformance.clauses.context import CheckContext
from conformance.core.clause import Clause
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation

# -- case builders --------------------------------------------------------------------------------------------

factors = st.dictionaries(st.sampled_from("abcd"), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
                          min_size=2, max_size=4)


@given(factors, st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_pairwise_covers_every_valid_pair(fs: dict[str, list[int]], forbidden: int) -> None:
    def valid(c: dict[str, int]) -> bool:  # a constraint, as grad_matrix has one: drop one value of one factor
        return c[min(fs)] != forbidden or len(fs[min(fs)]) == 1

    chosen = pairwise(fs, valid)
    assert all(valid(c) for c in chosen)
    full = [dict(zip(fs, combo)) for combo in itertools.product(*fs.values())]
    for a, b in itertools.combinations(fs, 2):
        wanted = {(c[a], c[b]) for c in full if valid(c)}
        assert wanted == {(c[a], c[b]) for c in chosen}, (a, b)


@pytest.mark.parametrize("bits", [4])
def test_every_nine_base_cases_meet_every_dtype_pair(bits: int) -> None:
    cases = with_storage_dtypes(base_cases(bits, dtypes=COMPUTE_DTYPES))
    every = set(itertools.product(COMPUTE_DTYPES, STORAGE_DTYPES))
    assert len(cases) >= 9
    for start in range(len(cases) - 8):
        assert {(c.compute_dtype, c.weight_dtype) for c in cases[start:start + 9]} == every, start


# -- the bound test -------------------------------------------------------------------------------------------

def _ctx() -> CheckContext:
    return CheckContext(impl=ReferenceImplementation(), clause=_clause(lambda ctx: None))


@pytest.mark.parametrize("ratio, fails", [(0.0, False), (0.5, False), (1.0, False), (1.0000001, True), (2.0, True),
                                          (math.inf, True), (math.nan, True), (-math.inf, False)])
def test_bounded_fails_above_one_and_on_nan(ratio: float, fails: bool) -> None:
    ctx = _ctx()
    called = []

    def message() -> str:
        called.append(True)
        return "over"

    if fails:
        with pytest.raises(ClauseFailure, match="over"):
            ctx.bounded("ratio", ratio, message)
    else:
        ctx.bounded("ratio", ratio, message)
    assert bool(called) == fails  # the message (which may scan a tensor) is built only on failure
    kept = ctx.measurements["ratio"]  # 4 significant digits; a NaN is kept as inf (never as "not worse")
    assert kept == (float(f"{ratio:.4g}") if math.isfinite(ratio) else math.inf)


def test_bounded_keeps_the_worst_ratio() -> None:
    ctx = _ctx()
    for r in (0.2, 0.9, 0.4):
        ctx.bounded("ratio", r, lambda: "over")
    assert ctx.measurements["ratio"] == 0.9


# -- family aggregation ---------------------------------------------------------------------------------------

#: what a family's check does -> the family outcome it must give
BEHAVIOURS = {"pass": "passed", "fail": "failed", "error": "error", "all-cases-skipped": "inconclusive",
              "skip": "skipped"}
FAMILIES = [("lora", 4), ("lora", 8), ("oft", 4), ("oft", 8)]


def _clause(check) -> Clause:  # noqa: ANN001
    return Clause(id="META-FAMILIES", level="MUST", text="t", source="s", area="meta", check=check,
                  methods=frozenset(m for m, _ in FAMILIES))


def _check_doing(plan: dict[tuple[str, int], str]):  # noqa: ANN202
    def check(ctx: CheckContext) -> None:
        what = plan[ctx.family]
        if what == "skip":
            ctx.skip("not for this family")
        for i in range(2):
            with ctx.case(f"case {i}"):
                if what == "fail" and i == 0:
                    ctx.fail("wrong")
                if what == "error" and i == 1:
                    raise RuntimeError("the suite's own bug")
                if what == "all-cases-skipped":
                    ctx.skip_this_case("does not apply")
    return check


@given(st.lists(st.sampled_from(sorted(BEHAVIOURS)), min_size=4, max_size=4))
@settings(max_examples=40, deadline=None)
def test_a_clause_takes_the_worst_family_outcome(behaviours: list[str]) -> None:
    plan = dict(zip(FAMILIES, behaviours))
    res = run_clause(_clause(_check_doing(plan)), ReferenceImplementation())
    expected = {f"{m}/{b}bit": BEHAVIOURS[plan[(m, b)]] for m, b in FAMILIES}
    assert {f: fam.outcome for f, fam in res.families.items()} == expected
    worst_first = ("failed", "error", "inconclusive", "passed", "skipped")  # the documented order, written out
    assert res.outcome == next(o for o in worst_first if o in expected.values())
    for (m, b), what in plan.items():
        fam = res.families[f"{m}/{b}bit"]
        assert fam.run == {"pass": 2, "fail": 2, "error": 2, "all-cases-skipped": 0, "skip": 0}[what], (what, fam)
        assert fam.skipped == (2 if what == "all-cases-skipped" else 0), (what, fam)
