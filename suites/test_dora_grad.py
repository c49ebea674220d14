"""DoRA in the backprop clauses: the magnitude's gradient is checked, the norm must be detached (the broken twin
``dora-norm-not-detached`` fails BACKPROP-GRAD-F64 and nothing that looks only at values), mixed batches are left out
with the limitation's reason."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from conformance.clauses import clause as clauses
from conformance.clauses.backprop.broken import MORE, Wrapped
from conformance.core.vocabulary import Method
from conformance.harness.execute import run_clause
from conformance.harness.results import Result
from conformance.impls.reference import ReferenceImplementation
from conformance.numerics.dora import MAGNITUDE

GRAD, MIXED, NOGRAD = "BACKPROP-GRAD-F64", "BACKPROP-MIXED-GRAD-F64", "BACKPROP-NOGRAD-FORWARD"
TWIN = "broken-dora-norm-not-detached"


def dora_only(impl: ReferenceImplementation) -> ReferenceImplementation:
    """``impl`` (a copy) declaring DoRA alone: only the dora case families run."""
    impl = copy.copy(impl)
    impl.methods = frozenset({Method.DORA})
    return impl


def run(cid: str, impl: object) -> Result:
    return run_clause(clauses.get(cid), impl)  # type: ignore[arg-type]


def norm_twin() -> ReferenceImplementation:
    [impl] = [t for c, t in MORE if c == GRAD and t.name == TWIN]
    return dora_only(impl)


def test_reference_passes_the_dora_families() -> None:
    for cid in (GRAD, NOGRAD):
        res = run(cid, dora_only(ReferenceImplementation()))
        assert res.outcome == "passed", res.message
        assert res.measurements["cases"] >= 20
        ratios = [v for k, v in res.measurements.items() if k.startswith("dora.") and "ratio" in k]
        assert ratios and all(0 <= r <= 1 for r in ratios)


def test_norm_not_detached_fails_the_gradient_clause() -> None:
    """Gradients through ``||W0 + s B A||_c`` change those of A and B far beyond the rounding bound."""
    res = run(GRAD, norm_twin())
    assert res.outcome == "failed", res.message
    assert "dora/4bit" in res.message and "dora/8bit" in res.message
    assert "grad wrt default:lora_A.weight" in res.message or "grad wrt default:lora_B.weight" in res.message


@pytest.mark.parametrize("cid", [NOGRAD, "FWD-ORACLE", "MERGE-FORWARD-BOUND"])
def test_norm_not_detached_passes_what_sees_only_values(cid: str) -> None:
    """The twin's outputs and merges are the reference's: only BACKPROP-GRAD-F64 can tell."""
    res = run(cid, norm_twin())
    assert res.outcome == "passed", res.message


def test_magnitude_gradient_is_checked() -> None:
    """A wrong gradient of the magnitude alone (A's and B's right) fails the clause, naming the magnitude."""

    def patch(layer: nn.Module) -> None:
        layer.adapter_parameters("default")[MAGNITUDE].register_hook(lambda g: 1.01 * g)

    res = run(GRAD, Wrapped(patch, frozenset({Method.DORA})))
    assert res.outcome == "failed", res.message
    assert f"grad wrt default:{MAGNITUDE}" in res.message


def test_mixed_batches_are_left_out_with_the_limitation() -> None:
    res = run(MIXED, dora_only(ReferenceImplementation()))
    assert res.outcome == "skipped", res.message
    assert "Cannot pass `adapter_names` when DoRA is enabled." in res.message
