"""``conformance.quant`` on 8-bit layers with ``has_fp16_weights`` (bitsandbytes' default, LitGPT's int8 training mode).

Such a layer stores its weight in float16 and bitsandbytes quantizes it row-wise at each forward that needs the int8
form (bitsandbytes 0.50.2 ``autograd/_functions.py``): ``dequantize`` is what that forward multiplies by,
``weight_bound`` bounds it from the float weight handed in, ``requantize`` keeps the float16 storage, the flag and the
threshold and drops the statistics bitsandbytes cached, ``snapshot`` holds the float16 weight (no SCB), and the
validator accepts it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import numerics
from conformance.clauses import cases
from conformance.quant import dequantize, make_base_layer, quant_settings, requantize, snapshot, validate, weight_bound
from conformance.quant import layers as qlayers
from conformance.quant.bounds import fp16_master_gap

KINDS = ("normal", "midpoint", "outlier", "constant", "row_scales")


def _weight(kind: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=gen) / cols**0.5
    if kind == "midpoint":  # every value at the middle of an int8 step, row absmax 1
        w = torch.full((rows, cols), 100.5 / 127) * torch.sign(w)
        w[:, 0] = 1.0
    elif kind == "outlier":
        w[:, 3] = 50.0
    elif kind == "constant":
        w = torch.full((rows, cols), 0.37)
    elif kind == "row_scales":
        w = w * torch.logspace(-4, 3, rows)[:, None]
    return w


def _fp16w(threshold: float = 0.0, weight: torch.Tensor | None = None, bias: bool = True) -> torch.nn.Module:
    return make_base_layer(64, 48, bits=8, has_fp16_weights=True, threshold=threshold, weight=weight, bias=bias)


def test_the_base_is_built_as_asked() -> None:
    layer = _fp16w(threshold=6.0)
    w = layer.weight
    assert isinstance(w, bnb.nn.Int8Params) and w.dtype == torch.float16 and w.has_fp16_weights
    assert not w.requires_grad  # frozen, as an adapter's base
    assert layer.state.has_fp16_weights and layer.state.threshold == 6.0
    assert qlayers.is_quantized(layer) and qlayers.has_fp16_weights(layer)
    assert not qlayers.has_fp16_weights(make_base_layer(64, 48, bits=8))
    assert quant_settings(layer) == {"bits": 8, "has_fp16_weights": True, "threshold": 6.0, "state_has_fp16_weights": True}


def test_base_case_axis() -> None:
    got = cases.fp16_weight_cases(8)
    assert [c.compute_dtype for c in got] == list(cases.COMPUTE_DTYPES)
    assert {c.threshold for c in got} == {0.0, cases.INT8_THRESHOLD}
    assert {(c.in_features, c.out_features) for c in got} == set(cases.ORIENTATION_SHAPES)
    assert all(c.has_fp16_weights and c.label.endswith("-fp16w") for c in got)
    assert cases.fp16_weight_cases(4) == []
    assert all(cases.BaseCase.from_json(c.to_json()) == c for c in got)
    assert "has_fp16_weights" not in cases.BaseCase(4).layer_kwargs()
    assert qlayers.has_fp16_weights(got[0].build())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dequantize_is_what_the_forward_multiplies_by(training: bool) -> None:
    """Training mode (CPU: ``MatMul8bitFp``, ``linear(x, CB * (SCB * (1/127)))``) with the identity as input returns
    the weight it multiplies by, which is ``dequantize``'s ``(CB * SCB) * (1/127)`` up to the float32 roundings of
    the two associations (two each); eval mode (``MatMul8bitLt``) caches that int8 form in the state."""
    layer = _fp16w(bias=False).train(training)
    with torch.no_grad():
        y = layer(torch.eye(64))
    w = dequantize(layer)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(layer.weight.data.to(torch.float16))
    assert torch.equal(w, bnb.functional.int8_vectorwise_dequant(cb, scb))
    assert torch.equal(layer.state.CB, cb) and torch.equal(layer.state.SCB, scb)
    if training:
        assert numerics.max_ratio((y.t().double() - w.double()).abs(), 4 * numerics.U32 * w.double().abs()) <= 1.0
    assert not torch.equal(w, layer.weight.data.float())  # the int8 form, not the float16 weight


@given(st.sampled_from(KINDS), st.integers(0, 2**16))
def test_weight_bound_holds(kind: str, seed: int) -> None:
    w = _weight(kind, 48, 64, torch.Generator().manual_seed(seed))
    layer = _fp16w(weight=w)
    err = (dequantize(layer).double() - w.double()).abs()
    r = numerics.max_ratio(err, weight_bound(layer))
    assert r <= 1.0, f"bound violated: max err/bound {r:.4g}"


def test_weight_bound_reads_the_weight_not_the_cache() -> None:
    """A stale ``state.SCB`` (what an eval forward leaves) does not enter the bound: it is computed from the weight."""
    layer = _fp16w().eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    before = weight_bound(layer)
    layer.weight.data.mul_(4)  # the cache still holds the old statistics
    assert torch.allclose(weight_bound(layer), 4 * before, rtol=1e-3)


def test_fp16_master_gap_is_the_int8_rounding() -> None:
    layer = _fp16w()
    gap = fp16_master_gap(layer)
    assert torch.equal(gap, (layer.weight.data.double() - dequantize(layer).double()).abs())
    assert 0 < float(gap.max()) and numerics.max_ratio(gap, weight_bound(layer)) <= 1.0
    assert not fp16_master_gap(make_base_layer(64, 48, bits=8)).any()


def test_requantize_keeps_settings_and_drops_the_cache() -> None:
    """After an eval forward cached the int8 weight, ``requantize`` stores the new weight as float16 with the flag and
    the threshold, and the next eval forward is the one of a base built from that weight."""
    layer = _fp16w(threshold=6.0).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
    assert layer.state.CB is not None
    exp = validate.expected_of(layer, at_merge=True)
    new = dequantize(layer) + 0.05
    requantize(layer, new)
    w = layer.weight
    assert w.dtype == torch.float16 and w.has_fp16_weights and not w.requires_grad
    assert layer.state.threshold == 6.0 and layer.state.has_fp16_weights and layer.state.CB is None
    assert exp is not None and validate.base_problems(layer, exp) == []
    fresh = _fp16w(threshold=6.0, weight=new).eval()
    fresh.bias.data = layer.bias.data.clone()
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))
    r = numerics.max_ratio((dequantize(layer).double() - new.double()).abs(), weight_bound(layer))
    assert r <= 1.0


def test_snapshot_is_the_float16_weight() -> None:
    layer = _fp16w()
    snap = snapshot(layer)
    assert set(snap.tensors) == {"weight", "bias"}
    assert torch.equal(snap.tensors["weight"], layer.weight.data.reshape(-1).view(torch.uint8))
    layer.weight.data[0, 0] += 1
    assert snap.differences(snapshot(layer)) == ["weight"]


def test_validator_names_what_a_merge_can_lose() -> None:
    layer = _fp16w(threshold=6.0)
    exp = validate.expected_of(layer, at_merge=True)
    assert exp is not None and exp.settings["fp16_weight_dtype"] == "torch.float16"
    assert validate.base_problems(layer, exp) == []
    w = layer.weight
    layer.weight = bnb.nn.Int8Params(w.data.float(), requires_grad=False, has_fp16_weights=True)
    assert validate.base_problems(layer, exp) == [
        "the base no longer carries its original settings: fp16_weight_dtype torch.float16 -> torch.float32"]
    layer.weight = bnb.nn.Int8Params(w.data.clone(), requires_grad=False).to("cpu")  # quantized to int8
    bad = validate.base_problems(layer, exp)
    assert bad and "has_fp16_weights True -> False" in bad[0]
    layer.weight = w
    layer.state.has_fp16_weights = False
    assert validate.base_problems(layer, exp) == [
        "the weight has has_fp16_weights=True but the layer's MatmulLtState has False"]


@pytest.mark.parametrize("fp16_weights", [False, True], ids=["int8", "fp16w"])
def test_weight_bound_below_float16_normal_range(fp16_weights: bool) -> None:
    """A row whose values lie below float16's smallest normal (2**-14) rounds by an absolute error, not ``u16``
    relative: the bound's ``FP16_SUBNORMAL_ERROR`` covers it, for both 8-bit kinds (they share the float16 cast)."""
    w = _weight("normal", 48, 64, torch.Generator().manual_seed(3))
    w[0] = w[0] * 1e-5  # row 0 of order 1e-6: float16 subnormals, whose rounding outgrows the int8 step s/254
    layer = make_base_layer(64, 48, bits=8, has_fp16_weights=fp16_weights, weight=w)
    err = (dequantize(layer).double() - w.double()).abs()
    assert numerics.max_ratio(err[0], weight_bound(layer)[0]) <= 1.0
