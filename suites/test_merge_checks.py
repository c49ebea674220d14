"""Every forward / merge / safe-merge / OFT-math clause passes on the reference and fails on a broken layer.

Each broken implementation subclasses the reference implementation and patches one behaviour of
the layer it creates (a bug someone could plausibly write); the clause must report ``failed``.
"""

from __future__ import annotations

import pytest

from conformance.clauses.broken import Broken, more_twins, twins
from conformance.clauses.clause import get
from conformance.clauses.merge.broken import requant_from_float32
from conformance.harness.execute import run_clause
from conformance.testing import broken_twin_tests

AREAS = {"forward", "merge", "safe_merge", "oft_math"}
#: one broken twin per clause of these areas (``conformance.clauses.<area>.broken``)
BROKEN = twins(AREAS)

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)

#: (clause, broken twin): each fails its clause through one of the cases for storage dtypes, lora_bias in the
#: oracles, the output dtype and a valid base after a merge
NEW_CASES: list[tuple[str, Broken]] = more_twins(["forward", "merge"])



@pytest.mark.parametrize(("clause_id", "impl"), NEW_CASES, ids=[f"{c}-{b.name}" for c, b in NEW_CASES])
def test_new_case_fails_on_broken(clause_id: str, impl: Broken) -> None:
    res = run_clause(get(clause_id), impl)
    assert res.outcome == "failed", f"{impl.name}: {res.outcome}: {res.message}"


@pytest.mark.parametrize("family", ["lora/4bit", "lora/8bit"])
def test_requant_from_float32_fails_both_families(family: str) -> None:
    """4-bit: the storage dtype (quant_state.dtype) is lost; 8-bit: the bias dtype is."""
    res = run_clause(get("MERGE-KEEPS-QUANT-SETTINGS"), Broken("requant-from-float32", requant_from_float32))
    fams = res.family_texts()
    assert fams[family].startswith("failed"), fams
