"""DIST-DDP-GRADS-AGREE on gloo with 2 spawned ranks: the reference passes, broken variants fail.

The broken implementations are in ``conformance.clauses.distributed.broken`` (they pickle into the spawned
ranks, which import that module by name). Each breakage covers one family of one implementation
(``OneBreakagePerFamily``: per-rank state on 4-bit, lora_B hidden on 8-bit, DoRA's magnitude hidden on both), so
the module starts one process group for the broken cases; the reference's run is the session's
(``ddp_reference_result``, shared with suites/test_clauses.py). Tests that spawn ranks are the ``e2e`` tier.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from conformance.clauses.clause import registry
from conformance.clauses.distributed import checks as ddp_checks
from conformance.clauses.distributed.broken import OneBreakagePerFamily
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available in this torch build"),
]

CLAUSE = "DIST-DDP-GRADS-AGREE"


@pytest.fixture(scope="module")
def broken_result(clause):
    return run_clause(clause, OneBreakagePerFamily())


@pytest.fixture(scope="module")
def clause():
    return registry()[CLAUSE]


@pytest.mark.e2e
def test_reference_passes_every_family(ddp_reference_result) -> None:
    """The session's one reference run (suites/conftest.py; test_clauses judges the same result)."""
    res = ddp_reference_result
    assert res.outcome == "passed", res.message
    assert res.family_texts() == {f: "passed" for f in ("lora/4bit", "lora/8bit", "oft/4bit", "oft/8bit", "dora/4bit",
                                                        "dora/8bit")}
    # the single-process comparison is informative: rounding differences exist and stay under the bound
    assert 0 < res.measurements["grad_ratio"] <= 1


@pytest.mark.e2e
@pytest.mark.parametrize("family, says", [
    ("lora/4bit", ["single process on the whole batch"]),  # state differing per rank
    ("lora/8bit", ["differ between rank 0 and rank 1", "lora_B.weight"]),  # parameters hidden from DDP
    ("dora/4bit", ["differ between rank 0 and rank 1", "lora_magnitude_vector.weight"]),  # the magnitude hidden
    ("dora/8bit", ["differ between rank 0 and rank 1", "lora_magnitude_vector.weight"]),
])
def test_each_broken_family_fails_its_own_way(broken_result, family: str, says: list[str]) -> None:
    res = broken_result
    assert res.outcome == "failed", (res.outcome, res.message)
    text = res.family_texts()[family]
    assert text.startswith("failed") and all(s in text for s in says), text


def test_without_the_capability_it_is_skipped(clause) -> None:
    impl = ReferenceImplementation()
    impl.capabilities = impl.capabilities - {"distributed"}
    res = run_clause(clause, impl)
    assert res.outcome == "skipped" and "distributed" in res.message


def test_unpicklable_object_of_a_class_needing_arguments_is_skipped(clause) -> None:
    class Local(ReferenceImplementation):  # a local class: neither it nor its instances pickle
        name = "local"

    res = run_clause(clause, Local())
    assert res.outcome == "skipped", (res.outcome, res.message)
    assert "cannot be sent to spawned ranks" in res.message


def test_an_object_that_does_not_pickle_is_sent_as_its_class() -> None:
    impl = ReferenceImplementation()
    impl.unpicklable = lambda: None  # the instance no longer pickles; the class does and builds with no arguments
    assert ddp_checks.portable(impl) is ReferenceImplementation
    assert ddp_checks.portable(ReferenceImplementation()) is not ReferenceImplementation
