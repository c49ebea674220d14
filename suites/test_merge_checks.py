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


def test_requant_default_storage_fails_on_fp16_weight_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    """The twin also drops ``has_fp16_weights``: MERGE-KEEPS-QUANT-SETTINGS on the fp16-weight bases without the
    outlier threshold alone (what the threshold drop cannot reach) passes on the reference and fails on the twin."""
    from conformance.clauses import cases
    from conformance.clauses.merge import checks
    from conformance.clauses.merge.broken import requant_default_storage_and_threshold
    from conformance.impls.reference import ReferenceImplementation

    only = [c for c in cases.fp16_weight_cases(8) if not c.threshold]
    assert only and all(c.has_fp16_weights for c in only)
    monkeypatch.setattr(checks, "_settings_cases", lambda ctx, bits: only if bits == 8 else [])
    clause = get("MERGE-KEEPS-QUANT-SETTINGS")
    ok = run_clause(clause, ReferenceImplementation())
    assert ok.outcome == "passed", ok.message
    res = run_clause(clause, Broken("requant-default-storage-and-threshold", requant_default_storage_and_threshold))
    fams = res.family_texts()
    assert fams["lora/8bit"].startswith("failed") and "has_fp16_weights" in fams["lora/8bit"], fams
