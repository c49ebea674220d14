"""DoRA in the backprop and dropout clauses: the magnitude's gradient is checked, the norm must be detached (the
broken twin ``dora-norm-not-detached`` fails BACKPROP-GRAD-F64 and nothing that looks only at values), mixed batches
are left out with the limitation's reason; the dropout twins bite on the dora families, and the mean, range and
rounding of a train-mode DoRA forward with dropout (``numerics.dropout.dora_dropout_mean``) hold for drawn masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conformance.clauses import cases
from conformance.clauses import clause as clauses
from conformance.clauses.backprop.broken import MORE, Wrapped
from conformance.clauses.broken import twins
from conformance.clauses.interface import AdapterSpec
from conformance.core.vocabulary import Method
from conformance.harness.execute import run_clause
from conformance.harness.results import Result
from conformance.impls.reference import ReferenceImplementation, cast_adapter
from conformance.numerics import dora as nd
from conformance.numerics.dora import MAGNITUDE
from conformance.numerics.dropout import dora_dropout_mean
from conformance.numerics.ratio import max_ratio
from conformance.quant import dequantize, make_base_layer
from conformance.reference import layer_class

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


# -- dropout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", sorted(twins(["dropout"])))
def test_dropout_twins_fail_on_the_dora_families(cid: str) -> None:
    """Each dropout clause passes on the reference's dora families and fails on its twin's (not only its LoRA or
    OFT families: the DoRA eval path never calls the dropout module, as PEFT's)."""
    assert run(cid, dora_only(ReferenceImplementation())).outcome == "passed"
    res = run(cid, dora_only(twins(["dropout"])[cid]))
    assert res.outcome == "failed", res.message
    assert "dora/4bit" in res.message and "dora/8bit" in res.message


#: (base case, input dtype, adapter dtype) of the dropout-mean tests
DROPOUT_CASES = [
    (cases.BaseCase(4, quant_type="nf4", compute_dtype=torch.float32), torch.float32, torch.float32),
    (cases.BaseCase(4, quant_type="fp4", compute_dtype=torch.bfloat16), torch.bfloat16, torch.bfloat16),
    (cases.BaseCase(8), torch.float16, torch.float32),
]
P, PARAMS = 0.5, {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}


def dropout_layer(case: cases.BaseCase, adapter_dtype: torch.dtype) -> nn.Module:
    base = make_base_layer(case.in_features, case.out_features, seed=0, **case.layer_kwargs())
    layer = layer_class("dora", case.bits)(base, "default", lora_dropout=P, **PARAMS)
    cases.fill_adapter(layer, "default", torch.Generator().manual_seed(1))
    cases.trained_magnitude(layer, "default", torch.Generator().manual_seed(2))
    cast_adapter(layer, AdapterSpec(method="dora", params=PARAMS, dtype=str(adapter_dtype).removeprefix("torch.")))
    return layer.train()


@pytest.mark.parametrize(("case", "x_dtype", "adapter_dtype"), DROPOUT_CASES,
                         ids=[f"{c.label}-{x}-{a}" for c, x, a in DROPOUT_CASES])
def test_dora_dropout_mean_range_and_rounding_hold_per_mask(case: cases.BaseCase, x_dtype: torch.dtype,
                                                            adapter_dtype: torch.dtype) -> None:
    """For drawn masks: the computed forward is within ``rounding`` of the exact forward of its mask (PEFT's
    composition, ``nd.dora_output``), that exact forward within ``spread`` of the mean, and the mean is the
    dropout-free output (the eval-mode oracle's value). On a one-hot row the forward's random part is one term
    ``c_ji x_i (k_i - 1)``, ``|k_i - 1| = 1`` at p = 1/2: exactly ``(1 - p)`` of the range, so the range is sharp."""
    layer = dropout_layer(case, adapter_dtype)
    onehot = torch.zeros(4, case.in_features)
    onehot[torch.arange(4), torch.tensor([0, 9, 30, 63])] = torch.tensor([1.5, -1.5, 2.0, -0.75])
    dense = torch.randn(4, case.in_features, generator=torch.Generator().manual_seed(3))
    x = torch.cat([onehot, dense]).to(x_dtype)
    mean = dora_dropout_mean(layer, "default", {**PARAMS, "lora_dropout": P}, x)
    tensors = layer.adapter_parameters("default")
    s = PARAMS["lora_alpha"] / PARAMS["r"]
    w0 = dequantize(layer.base_layer).double()
    bias = layer.base_layer.bias.detach().double()
    a, b, m = (tensors[k].detach().double() for k in ("lora_A.weight", "lora_B.weight", MAGNITUDE))
    free = nd.dora_expected(layer.base_layer, tensors, s, x, training=False)
    assert torch.allclose(mean.value, free.value, rtol=1e-12, atol=1e-12)
    worst_round = worst_range = 0.0
    onehot_ranges = []
    for seed in range(12):
        torch.manual_seed(seed)  # the draw nn.Dropout makes in the forward, on x cast to the adapter dtype
        keep = torch.nn.functional.dropout(torch.ones(x.shape, dtype=adapter_dtype), P, training=True).double()
        torch.manual_seed(seed)
        with torch.no_grad():
            y = layer(x).double()
        exact = nd.dora_output(x.double(), w0, bias, a, b, m, s, keep=keep)
        worst_round = max(worst_round, max_ratio((y - exact).abs(), mean.rounding))
        worst_range = max(worst_range, max_ratio((exact - mean.value).abs(), mean.spread))
        onehot_ranges.append(((exact - mean.value).abs() / mean.spread)[:4])
    assert worst_round <= 1 and worst_range <= 1, (worst_round, worst_range)
    sharp = torch.full((12, 4, case.out_features), 1 - P, dtype=torch.float64)
    assert torch.allclose(torch.stack(onehot_ranges), sharp, rtol=1e-9)
