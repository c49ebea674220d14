"""The BACKPROP clauses: they pass on the reference and fail on deliberately broken layers.

Also the pieces they stand on: the pairwise case sampler and the float64 oracle with its bound.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses import clause as clauses
from conformance.clauses.backprop.broken import Scale, Wrapped, drop_lora_bias, wrap_forward
from conformance.harness.execute import run_clause
from conformance.harness.results import Result
from conformance.impls.reference import ReferenceImplementation

GRAD, MIXED, NOGRAD = "BACKPROP-GRAD-F64", "BACKPROP-MIXED-GRAD-F64", "BACKPROP-NOGRAD-FORWARD"


def run(cid: str, impl: object) -> Result:
    return run_clause(clauses.get(cid), impl)  # type: ignore[arg-type]


# -- passes on the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("cid", [GRAD, MIXED, NOGRAD])
def test_reference_passes(cid: str) -> None:
    res = run(cid, ReferenceImplementation())
    assert res.outcome == "passed", res.message
    assert res.measurements["cases"] >= 20
    ratios = [v for k, v in res.measurements.items() if "ratio" in k]
    assert ratios and all(0 <= r <= 1 for r in ratios)


# -- fails on broken layers -------------------------------------------------------------------------
def test_grad_fails_without_defensive_clone() -> None:
    """PEFT's defensive clone (peft/tuners/lora/bnb.py) on torch 2.13 CPU: the raw bnb output is a view for 1-D/3-D inputs; in-place add raises."""
    res = run(GRAD, ReferenceImplementation(clone_base_output=False))
    assert res.outcome == "failed", res.message
    assert "is a view and is being modified inplace" in res.message or "view was created" in res.message
    assert "lora" in res.message


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_grad_fails_on_doubled_adapter_gradient(method: str) -> None:
    def patch(layer: nn.Module) -> None:
        for p in layer.adapter_parameters("default").values():
            p.register_hook(lambda g: 2 * g)

    res = run(GRAD, Wrapped(patch, frozenset({method})))
    assert res.outcome == "failed", res.message
    assert f"grad wrt default:{'lora_A' if method == 'lora' else 'oft_R'}" in res.message or "grad wrt default" in res.message


def test_grad_fails_on_wrong_input_gradient() -> None:
    # forward exact, only dL/dx is off by 1 %: still far outside the fp32 rounding bound
    res = run(GRAD, Wrapped(lambda layer: wrap_forward(
        layer, lambda orig, x, names: orig(Scale.apply(x, 1.01), adapter_names=names))))
    assert res.outcome == "failed", res.message
    assert "grad wrt input" in res.message


def test_grad_fails_when_gradient_is_lost() -> None:
    """A gradient that never reaches lora_A (zeroed, as a stray detach would leave it) is caught."""

    def patch(layer: nn.Module) -> None:
        layer.adapter_parameters("default")["lora_A.weight"].register_hook(torch.zeros_like)

    res = run(GRAD, Wrapped(patch, frozenset({"lora"})))
    assert res.outcome == "failed", res.message
    assert "lora_A" in res.message


def test_mixed_fails_on_wrong_rows() -> None:
    def patch(layer: nn.Module) -> None:
        wrap_forward(layer, lambda orig, x, names: orig(
            x, adapter_names=None if names is None else ["default"] * len(names)))

    res = run(MIXED, Wrapped(patch))
    assert res.outcome == "failed", res.message
    assert "-mixed" in res.message


@pytest.mark.parametrize("cid", [GRAD, MIXED])
def test_grad_fails_when_forward_drops_lora_bias(cid: str) -> None:
    res = run(cid, Wrapped(drop_lora_bias, frozenset({"lora"})))
    assert res.outcome == "failed", res.message
    if cid == GRAD:  # mixed: the case label names the first adapter; the lora_bias one may be the second
        assert "lora_bias=True" in res.message


@pytest.mark.parametrize("cid", [GRAD, NOGRAD])
def test_fails_when_output_dtype_is_not_the_input_dtype(cid: str) -> None:
    res = run(cid, Wrapped(lambda layer: wrap_forward(
        layer, lambda orig, x, names: orig(x, adapter_names=names).float())))
    assert res.outcome == "failed", res.message
    assert "torch.float32, expected" in res.message and "(the input's)" in res.message


def test_matrix_covers_storage_dtypes_shapes_and_lora_bias() -> None:
    """The case axes are in the sampled matrix: every storage dtype, square and non-square, lora_bias."""
    for mixed in (False, True):
        matrix = cases.grad_matrix("lora", [4, 8], mixed=mixed)
        assert {c.base.weight_dtype for c in matrix} == set(cases.STORAGE_DTYPES)
        assert {c.base.out_features for c in matrix} == {cases.GRAD_OUT_FEATURES, cases.GRAD_IN_FEATURES}
        assert any(c.adapter.params.get("lora_bias") for c in matrix)
        pairs = {(c.dtype, c.base.weight_dtype) for c in matrix}
        assert pairs == set(itertools.product(cases.GRAD_DTYPES, cases.STORAGE_DTYPES))


def test_matrix_has_the_8bit_threshold_factor_with_outlier_inputs() -> None:
    """The 8-bit cases at threshold 6.0 meet every compute and storage dtype (pairwise); 4-bit ones have no
    threshold; a case at 6.0 takes inputs whose outlier columns reach the threshold."""
    for method, mixed in itertools.product(("lora", "oft"), (False, True)):
        matrix = cases.grad_matrix(method, [4, 8], mixed=mixed)
        eight = [c for c in matrix if c.base.bits == 8]
        assert not any(c.base.threshold for c in matrix if c.base.bits == 4)
        outliers = [c for c in eight if c.base.threshold == cases.INT8_THRESHOLD]
        assert {c.dtype for c in outliers} == set(cases.GRAD_DTYPES)
        assert {c.base.weight_dtype for c in outliers} == set(cases.STORAGE_DTYPES)
        assert {c.x_requires_grad for c in outliers} == {True, False}
        assert {c.base.threshold for c in cases.grad_matrix(method, [8], mixed=mixed)} == set(cases.INT8_THRESHOLDS)
    case = next(c for c in cases.grad_matrix("lora", [8]) if c.base.threshold)
    x = torch.zeros(case.input_shape(), dtype=case.dtype)
    assert bool((case.with_outliers(x).abs() >= case.base.threshold).any())
    plain = next(c for c in cases.grad_matrix("lora", [8]) if not c.base.threshold)
    assert plain.with_outliers(x) is x


def test_mixed_skipped_without_capability() -> None:
    impl = ReferenceImplementation()
    impl.capabilities = ReferenceImplementation.capabilities - {"mixed_batch"}
    assert run(MIXED, impl).outcome == "skipped"


def test_nograd_fails_when_no_grad_output_differs() -> None:
    def fn(orig: Callable[..., torch.Tensor], x: torch.Tensor, names: object) -> torch.Tensor:
        y = orig(x, adapter_names=names)
        return y if torch.is_grad_enabled() else y * 1.01

    res = run(NOGRAD, Wrapped(lambda layer: wrap_forward(layer, fn)))
    assert res.outcome == "failed", res.message
    assert "differs from the grad-mode output" in res.message


def test_nograd_fails_when_inference_mode_raises() -> None:
    def fn(orig: Callable[..., torch.Tensor], x: torch.Tensor, names: object) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Inference tensors cannot be saved for backward")
        return orig(x, adapter_names=names)

    res = run(NOGRAD, Wrapped(lambda layer: wrap_forward(layer, fn)))
    assert res.outcome == "failed" and "inference_mode" in res.message, res.message


def test_nograd_fails_when_output_requires_grad() -> None:
    def fn(orig: Callable[..., torch.Tensor], x: torch.Tensor, names: object) -> torch.Tensor:
        y = orig(x, adapter_names=names)
        if torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return y
        with torch.enable_grad():
            return y + 0 * layer_param(orig).sum()

    def layer_param(orig: Callable[..., torch.Tensor]) -> torch.Tensor:
        return next(iter(orig.__self__.adapter_parameters("default").values()))  # type: ignore[attr-defined]

    res = run(NOGRAD, Wrapped(lambda layer: wrap_forward(layer, fn)))
    assert res.outcome == "failed" and "requires grad" in res.message, res.message


# -- the pieces ---------------------------------------------------------------------------------------
def test_pairwise_covers_every_pair_deterministically() -> None:
    factors = {"a": (1, 2, 3), "b": ("x", "y"), "c": (True, False), "d": (0, 1, 2)}
    got = cases.pairwise(factors)
    assert got == cases.pairwise(factors)
    assert len(got) < len(list(itertools.product(*factors.values())))
    for (f1, v1), (f2, v2) in itertools.combinations([(f, v) for f in factors for v in factors[f]], 2):
        if f1 != f2:
            assert any(c[f1] == v1 and c[f2] == v2 for c in got), (f1, v1, f2, v2)


def test_pairwise_respects_constraints() -> None:
    matrix = cases.grad_matrix("lora", [4, 8])
    assert all(c.rank > 1 or c.batch == 1 for c in matrix)
    assert {c.rank for c in matrix} == {1, 2, 3} and {c.dtype for c in matrix} == set(cases.GRAD_DTYPES)
    assert {c.base.quant_label for c in matrix} == {"nf4", "fp4", "int8"} and {c.x_requires_grad for c in matrix} == {True, False}
    assert all(c.mixed and c.rank > 1 for c in cases.grad_matrix("oft", [4], mixed=True))


def test_oracle_is_exact_in_float64_and_bound_scales_with_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=gen).double(), torch.randn(48, generator=gen).double()
    a, bb = torch.randn(4, 64, generator=gen).double(), torch.randn(48, 4, generator=gen).double()
    state = numerics.LayerState(w, b, "lora", {"default": {"r": 4, "lora_alpha": 8.0}},
                          {"default": {"lora_A.weight": a, "lora_B.weight": bb}})
    x, g = torch.randn(3, 64, generator=gen).double(), torch.randn(3, 48, generator=gen).double()
    exp = numerics.grad_expected(state, x, g, compute_dtype=torch.float32)
    torch.testing.assert_close(exp.y, x @ w.t() + b + 2.0 * (x @ a.t()) @ bb.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exp.grads["x"], g @ w + 2.0 * (g @ bb) @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exp.grads["default:lora_A.weight"], 2.0 * (g @ bb).t() @ x, rtol=1e-12, atol=1e-12)
    bf = numerics.grad_expected(state, x, g, compute_dtype=torch.bfloat16)
    assert (exp.y_bound > 0).all() and (bf.y_bound > 10 * exp.y_bound).all()


def test_oracle_oft_matches_reference_rotation() -> None:
    from conformance.reference import rotation

    gen = torch.Generator().manual_seed(1)
    theta = 0.1 * torch.randn(4, rotation.n_elements(16), generator=gen).double()
    w = torch.randn(48, 64, generator=gen).double()
    state = numerics.LayerState(w, None, "oft", {"default": {"r": 4, "oft_block_size": 0}},
                          {"default": {"oft_R.weight": theta}})
    x, g = torch.randn(2, 64, generator=gen).double(), torch.randn(2, 48, generator=gen).double()
    exp = numerics.grad_expected(state, x, g, compute_dtype=torch.float32)
    r = rotation.block_diagonal(rotation.cayley(rotation.skew(theta, 16)), 4)
    torch.testing.assert_close(exp.y, x @ r @ w.t(), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(exp.grad_bounds["default:oft_R.weight"]).all()
