"""The twin area: its clauses pass on the reference and fail on their broken twins, and its numerics read the
twin right (``conformance.numerics.twin``: the linear map and the transforms; the twin agrees with the hand
oracles of LoRA and OFT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.broken import twins
from conformance.core import methods as mtable
from conformance.core.vocabulary import ORACLE_METHODS, TWIN_METHODS, Method
from conformance.impls.reference import ReferenceImplementation
from conformance.numerics import twin as ntwin
from conformance.testing import broken_twin_tests

AREAS = {"twin"}
BROKEN = twins(AREAS)

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)


def test_every_method_has_a_table_row_and_twin_methods_are_the_rest() -> None:
    mtable.check_complete()
    assert TWIN_METHODS == frozenset(Method) - ORACLE_METHODS - {Method.OTHER}
    structural = {m for m, r in mtable.TABLE.items() if r.rule is mtable.TwinRule.STRUCTURAL}
    assert structural == {Method.DORA, Method.BOFT, Method.OTHER}


@pytest.mark.parametrize("bits", [4, 8])
def test_the_fixed_bases_are_valid_for_merges(bits: int) -> None:
    """The merge clauses' bases keep bitsandbytes' CPU dequantize right (in_features a multiple of the blocksize)."""
    from conformance.clauses.twin import cases as tcases

    for case in tcases.BASES[bits]:
        combo = {"shape": (case.in_features, case.out_features), "blocksize": case.blocksize,
                 "cpu_packed": case.cpu_packed}
        assert cases.base_invalid(bits, combo, merges=True) is None, case.label


def test_linear_map_is_exact_for_an_affine_function() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    c = torch.randn(5, generator=gen, dtype=torch.float64)
    got_m, got_c = ntwin.linear_map(lambda x: x @ m.t() + c, 7)
    assert torch.equal(got_c, c)
    assert torch.allclose(got_m, m, rtol=0, atol=1e-15)


class _Sandwich(nn.Module):
    """``S base(x T)`` over a dense base: what ``transforms`` must read back."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, n_in: int, n_out: int) -> None:
        super().__init__()
        self.s, self.t = s, t
        self.base_layer = nn.Linear(n_in, n_out, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x @ self.t) @ self.s.t()


@pytest.mark.parametrize(("n_in", "n_out"), [(6, 4), (4, 6), (5, 5)])
def test_transforms_recovers_s_and_t_whatever_the_shape(n_in: int, n_out: int) -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.eye(n_out, dtype=torch.float64) + 0.3 * torch.randn(n_out, n_out, generator=gen, dtype=torch.float64)
    t = torch.randn(n_in, n_in, generator=gen, dtype=torch.float64)
    layer = _Sandwich(s, t, n_in, n_out)
    w_before = layer.base_layer.weight.detach().clone()
    got_s, got_t = ntwin.transforms(layer)
    assert torch.allclose(got_s, s, rtol=0, atol=1e-12)
    assert torch.allclose(got_t, t, rtol=0, atol=1e-12)
    assert torch.equal(layer.base_layer.weight, w_before)  # probes run on a copy


@pytest.mark.parametrize("method", ["lora", "oft"])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_twin_rule_agrees_with_the_hand_oracle(method: str, bits: int) -> None:
    """The twin's value is the hand oracle's (float64), and the reference's forward is within both bounds."""
    from conformance.clauses.clause import get
    from conformance.clauses.context import CheckContext
    from conformance.clauses.twin import cases as tcases

    impl = ReferenceImplementation()
    ctx = CheckContext(impl=impl, clause=get("TWIN-FORWARD"), device="cpu")
    base = cases.BaseCase(bits).build()
    params = tcases.params(method)
    layer = ctx.make_layer(base, method, **params)
    tcases.perturb(layer, torch.Generator().manual_seed(3))
    twin = tcases.Twin.of(ctx, layer, method, "test")
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(4))
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    oracle = numerics.layer_expected(layer, method, "default", params, x)
    exp = twin.expected(x, False)
    assert torch.allclose(exp.value, oracle.value, rtol=1e-12, atol=1e-12)
    assert exp.ratio(y) <= 1 and oracle.ratio(y) <= 1
