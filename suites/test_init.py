"""The init area: its clauses pass on the reference and fail on their broken twins; the reference's initializations
do what ``conformance.core.inits`` says (the residual plus the adapter is the weight; LoftQ's adapter is the best
rank-r fit of the quantization error); the table and the capabilities agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conformance.clauses import cases
from conformance.clauses.broken import more_twins, twins
from conformance.clauses.clause import get
from conformance.clauses.init import cases as icases
from conformance.core import inits
from conformance.core.vocabulary import Capability
from conformance.impls.reference import ReferenceImplementation
from conformance.reference import LoraLinearDense
from conformance.reference import inits as rinits
from conformance.testing import broken_twin_tests, run_clause

AREAS = {"init"}
BROKEN = twins(AREAS)

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)


@pytest.mark.parametrize(("clause_id", "impl"), more_twins(AREAS), ids=[b.name for _, b in more_twins(AREAS)])
def test_more_twins_fail(clause_id: str, impl: object) -> None:
    """LoftQ's rule fails a fit that ignores the scaling (with alpha / r = 2 the quantization error is exactly as
    large as without the adapter: only the best-fit bound catches it)."""
    res = run_clause(get(clause_id), impl)
    assert res.outcome == "failed", res.message
    assert "loftq" in res.message and "best rank" in res.message


def test_every_init_has_a_row_and_a_capability_of_its_own() -> None:
    inits.check_complete()
    assert {r.capability for r in inits.TABLE.values()} == {c for c in Capability if c.value.startswith("init_")}


@pytest.mark.parametrize("value, want", [("pissa", inits.Init.PISSA), ("pissa_niter_16", inits.Init.PISSA_NITER),
                                         ("olora", inits.Init.OLORA), ("loftq", inits.Init.LOFTQ), (True, None),
                                         ("gaussian", None), ("eva", None)])
def test_of_value_reads_peft_spellings(value: object, want: inits.Init | None) -> None:
    assert inits.of_value(value) is want


@pytest.mark.parametrize("bits", [4, 8])
def test_the_bases_are_valid_for_writing_a_residual(bits: int) -> None:
    for c in icases.BASES[bits]:
        b = c.base
        combo = {"shape": (b.in_features, b.out_features), "blocksize": b.blocksize, "cpu_packed": b.cpu_packed}
        assert cases.base_invalid(bits, combo, merges=True) is None, c.label


@pytest.mark.parametrize("value", ["pissa", "pissa_niter_4", "olora"])
def test_dense_residual_plus_adapter_is_the_weight(value: str) -> None:
    """Over a float64 nn.Linear the residual is written exactly: W' + s B A = W to float64 rounding, and the output
    at init is the original one."""
    torch.manual_seed(0)
    base = nn.Linear(32, 24, dtype=torch.float64)
    w = base.weight.detach().clone()
    x = torch.randn(5, 32, dtype=torch.float64)
    y0 = base(x).detach()
    layer = LoraLinearDense(base, r=4, lora_alpha=8, init_lora_weights=value)
    for p in layer.parameters():
        p.data = p.data.double()
    delta = layer.get_delta_weight("default").detach().double()
    assert float(delta.abs().max()) > 0.1  # the adapter holds the top of the weight, not zero
    assert torch.allclose(layer.base_layer.weight + delta, w, rtol=0, atol=1e-6)
    assert torch.allclose(layer(x), y0, rtol=0, atol=1e-5)


def test_pissa_takes_the_top_singular_values() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 32, dtype=torch.float64)
    a, b = rinits.factors(inits.Init.PISSA, "pissa", w, 4, 2.0)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.svdvals(2.0 * b @ a)[:4], s[:4], rtol=1e-10, atol=0)


def test_loftq_fits_the_quantization_error_best() -> None:
    """The reference's LoftQ step is the truncated SVD of W - Q: no rank-r matrix fits it better (Eckart-Young)."""
    torch.manual_seed(0)
    q = torch.randn(24, 32, dtype=torch.float64)
    wf = q + 0.1 * torch.randn(24, 32, dtype=torch.float64)
    a, b = rinits.factors(inits.Init.LOFTQ, "loftq", q, 4, 2.0, loftq_weight=wf)
    best = float((wf - q - 2.0 * b @ a).norm())
    s = torch.linalg.svdvals(wf - q)
    assert best == pytest.approx(float(s[4:].norm()), rel=1e-9)
    other = torch.randn(24, 4, dtype=torch.float64) @ torch.randn(4, 32, dtype=torch.float64) * 0.01
    assert best < float((wf - q - other).norm())


def test_reference_refuses_what_it_has_not_with_a_named_cause() -> None:
    base = cases.BaseCase(4).build()
    impl = ReferenceImplementation()
    from conformance.clauses.interface import AdapterSpec

    for value, words in (("corda", "init_lora_weights"), ("loftq", "loftq_weight")):
        with pytest.raises(ValueError, match=words):
            impl.create(base, AdapterSpec("lora", params={"init_lora_weights": value}))
