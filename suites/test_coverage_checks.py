"""Every dropout / lifecycle clause passes on the reference and fails on its broken variant
(``conformance.clauses.dropout.broken``, ``conformance.clauses.lifecycle.broken``), the pattern of
``suites/test_merge_checks.py``."""

from __future__ import annotations

import pytest
import torch

from conformance import numerics
from conformance.clauses.broken import twins
from conformance.testing import broken_twin_tests

AREAS = {"dropout", "lifecycle"}
BROKEN = twins(AREAS)


(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)


def test_hoeffding_halfwidth_matches_the_formula() -> None:
    width = torch.tensor([1.0, 2.0, 0.0, 4.0])
    t = numerics.hoeffding_halfwidth(width, 100, alpha=1e-6)
    expect = width.double() * (torch.log(torch.tensor(2 * 4 / 1e-6, dtype=torch.float64)) / 200).sqrt()
    assert torch.allclose(t, expect, rtol=0, atol=1e-15)
    assert (numerics.hoeffding_halfwidth(width, 400, alpha=1e-6) < t).sum() == 3  # shrinks with n (0 stays 0)


def test_hoeffding_bound_holds_empirically_for_bernoulli_means() -> None:
    """The bound at alpha is never exceeded over many simulated means (a Bernoulli(1/2) mean per element)."""
    gen = torch.Generator().manual_seed(0)
    n, k = 50, 2000
    means = torch.bernoulli(torch.full((n, k), 0.5, dtype=torch.float64), generator=gen).mean(0)
    t = numerics.hoeffding_halfwidth(torch.ones(k), n, alpha=1e-3)
    assert ((means - 0.5).abs() < t).all()
    # and it is not vacuous: a biased coin (p = 0.9) is caught
    biased = torch.bernoulli(torch.full((n, k), 0.9, dtype=torch.float64), generator=gen).mean(0)
    assert ((biased - 0.5).abs() >= t).any()


@pytest.mark.parametrize("bad", [0, -1])
def test_hoeffding_rejects_no_samples(bad: int) -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        numerics.hoeffding_halfwidth(torch.ones(3), bad)
