"""Merge/unmerge clauses: merged forward, round trip and repeated cycles within analytic bounds; warnings;
bookkeeping (twice, nothing merged, several adapters, subsets); lora_bias; requantization settings.

Numbers come from ``conformance.numerics`` (float64 value + bound, observed/bound ratio); every bound that involves a
requantization uses ``conformance.quant.weight_bound`` of the layer state *after* it (PEFT's
``peft/tuners/lora/bnb.py``: merge = dequantize -> apply -> requantize with the original settings).

DoRA goes through the same bnb merge in PEFT (``DoraLinearVariant.merge_safe`` forms the weight), but its merge is not
additive: ``numerics.merge_target`` gives ``f (W0 + s B A)`` with the norm on the unmerged weight, the round trip is
``dora.dora_roundtrip_bound`` (``numerics.roundtrip_bound`` with ``w0``/``wb1``), several adapters
``numerics.merge.dora_pair_merged`` (the forward's order, every norm on ``W0``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.merge.cases import (
    _bias_cases,
    _build,
    _draw_case,
    _forward_bound_cases,
    _label,
    _seed,
    _settings_cases,
    merge_known,
)
from conformance.clauses.merge.declare import CYCLES, ROUNDING_WORDS
from conformance.clauses.observe import recorded_warnings, user_warnings, warning_texts
from conformance.numerics.merge import dora_pair_merged
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


def _property(ctx: CheckContext, max_examples: int) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """Run a hypothesis property inside a check: derandomized, no database, no shrinking (speed)."""
    return settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None, print_blob=False,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
    )


def step(ctx: CheckContext, layer: torch.nn.Module, what: str, label: str, **kwargs: Any) -> None:
    """``layer.merge(**kwargs)`` / ``layer.unmerge()``, then: the base is still a valid quantized layer with
    what it had right before (``quant.validate``: layer type, packed storage, quant state, settings, dtypes)."""
    before = qvalidate.expected_of(layer.base_layer, at_merge=True)
    with recorded_warnings():
        getattr(layer, what)(**kwargs)
    if before is not None:
        bad = qvalidate.problems(layer, before)
        if bad:
            ctx.fail(f"{label}: after {what}() the base is no valid quantized layer: " + "; ".join(bad))


def _merged_expected(layer: torch.nn.Module, method: str, name: str, params: dict[str, Any], x: torch.Tensor,
                     w0: torch.Tensor, b0: torch.Tensor | None, w0_gap: torch.Tensor | None = None
                     ) -> tuple[numerics.Expected, torch.Tensor]:
    """Expected merged-layer output and the bound on |W_merged - target| (requantization + arithmetic). ``w0_gap``:
    how far the weight the merge may have started from is from ``w0`` (``quant.bounds.fp16_master_gap`` of the base
    before the merge; its float32 arithmetic is relative to that weight, hence the ``1 + u32``)."""
    wt, we, bt, be = numerics.merge_target(layer, method, name, params, w0, b0)
    err = qbounds.weight_bound(layer.base_layer) + we
    if w0_gap is not None:
        err = err + w0_gap * (1 + numerics.U32)
    return numerics.linear_expected(layer.base_layer, x, x.dtype, weight=wt, weight_err=err, bias=bt,
                                  bias_err=be), err


@check("MERGE-FORWARD-BOUND")
def check_merge_forward(ctx: CheckContext) -> None:
    @_property(ctx, ctx.budget.property_examples)
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        method, bits, case, params = _draw_case(ctx, data)
        label = _label(method, case, params)
        with ctx.case(label, isolate=False):
            layer = _build(ctx, method, case, params, seed=_seed(label))
            x = ctx.randn(5, case.in_features, dtype=case.compute_dtype, offset=1)
            with torch.no_grad():
                exp_u = numerics.layer_expected(layer, method, "default", params, x)
                y_u = layer(x)
                w0, b0 = numerics.base_weights(layer.base_layer)
                step(ctx, layer, "merge", label)
                ctx.check(bool(layer.merged), f"{label}: merged is False after merge()")
                exp_m, err = _merged_expected(layer, method, "default", params, x, w0, b0)
                wt = numerics.merge_target(layer, method, "default", params, w0, b0)[0]
                w1, _ = numerics.base_weights(layer.base_layer)
                y_m = layer(x)
            fam = f"{method}.{bits}bit"
            r_w = numerics.observed(w1, wt, err)
            ctx.bounded(f"ratio.merged_weight.{fam}", r_w, lambda: (
                f"{label}: the merged quant state dequantizes {float((w1 - wt).abs().max()):.3g} away from the merged "
                f"weight, beyond one requantization's bound (ratio {r_w:.3g})"))
            r_u, r_m = exp_u.ratio(y_u), exp_m.ratio(y_m)
            if case.weight_dtype is not None:
                # the text of this property is hypothesis' derandomized seed (``function_digest``): left as written
                ctx.measure_max(f"ratio.merged.{fam}.stored-{str(case.weight_dtype).removeprefix('torch.')}", r_m)
            ctx.measure_max(f"ratio.merged.{fam}", r_m)  # recorded even when the unmerged check below fails
            ctx.bounded(f"ratio.unmerged.{fam}", r_u,
                        lambda: f"{label}: unmerged forward outside the oracle bound {exp_u.describe(y_u)}")
            ctx.bounded(f"ratio.merged.{fam}", r_m,
                        lambda: f"{label}: merged forward outside the bound of one requantization {exp_m.describe(y_m)}")
            gap = (y_m.double() - y_u.double()).abs().cpu().reshape(exp_u.bound.shape)
            r = numerics.max_ratio(gap, exp_u.bound + exp_m.bound)
            ctx.bounded(f"ratio.merged_vs_unmerged.{fam}", r, lambda: (
                f"{label}: merged vs unmerged output differ by {gap.max():.3g}, beyond the sum of their bounds "
                f"(ratio {r:.3g})"))

    # the listed bases first: a failing example ends the property (and the check) with its exception
    for method, bits in ctx.cases():
        for case, training in itertools.product(_forward_bound_cases(bits), (True, False)):
            _merge_forward_listed(ctx, method, bits, case, dict(cases.adapter_cases(method)[0].params), training)
    prop()


def _merge_forward_listed(ctx: CheckContext, method: str, bits: int, case: cases.BaseCase, params: dict[str, Any],
                          training: bool) -> None:
    """MERGE-FORWARD-BOUND on one listed base (``_forward_bound_cases``), the property's checks in train or eval mode.
    The forward before the merge runs in that mode too: in eval mode it leaves bitsandbytes' cached int8 statistics
    (``MatmulLtState.CB``/``SCB``) behind, which a merge must reset for the merged forward to read the new weight.
    Inputs of threshold bases carry outlier columns (``cases.with_outliers``) in eval mode, where they matter. Such a
    base holds its weight in float16 and multiplies by its int8 form: a merge may add the delta to either (LitGPT
    adds it to the float16 weight, dequantize -> modify -> requantize to the int8 form), so the bound adds their
    exact gap once (``quant.bounds.fp16_master_gap``). (The property's own text is hypothesis' derandomized seed: its
    body is not shared with this.)"""
    label = f"{_label(method, case, params)} ({'train' if training else 'eval'})"
    with ctx.case(label, known=merge_known(ctx, case)):
        layer = _build(ctx, method, case, params, seed=_seed(label))
        layer.train(training)
        x = ctx.randn(5, case.in_features, dtype=case.compute_dtype, offset=1)
        if case.threshold and not training:
            x = cases.with_outliers(x, case.threshold)
        with torch.no_grad():
            exp_u = numerics.layer_expected(layer, method, "default", params, x)
            y_u = layer(x)
            w0, b0 = numerics.base_weights(layer.base_layer)
            gap = qbounds.fp16_master_gap(layer.base_layer)  # the float16 weight or its int8 form: either may merge
            step(ctx, layer, "merge", label)
            ctx.check(bool(layer.merged), f"{label}: merged is False after merge()")
            exp_m, err = _merged_expected(layer, method, "default", params, x, w0, b0, gap)
            wt = numerics.merge_target(layer, method, "default", params, w0, b0)[0]
            w1, _ = numerics.base_weights(layer.base_layer)
            y_m = layer(x)
        fam = f"{method}.{bits}bit"
        r_w = numerics.observed(w1, wt, err)
        ctx.bounded(f"ratio.merged_weight.{fam}", r_w, lambda: (
            f"{label}: the merged base dequantizes {float((w1 - wt).abs().max()):.3g} away from the merged weight, "
            f"beyond one requantization's bound (ratio {r_w:.3g})"))
        r_u, r_m = exp_u.ratio(y_u), exp_m.ratio(y_m)
        ctx.measure_max(f"ratio.merged.{fam}.fp16w", r_m)
        ctx.bounded(f"ratio.unmerged.{fam}", r_u,
                    lambda: f"{label}: unmerged forward outside the oracle bound {exp_u.describe(y_u)}")
        ctx.bounded(f"ratio.merged.{fam}", r_m,
                    lambda: f"{label}: merged forward outside the bound of one requantization {exp_m.describe(y_m)}")
        diff = (y_m.double() - y_u.double()).abs().cpu().reshape(exp_u.bound.shape)
        r = numerics.max_ratio(diff, exp_u.bound + exp_m.bound)
        ctx.bounded(f"ratio.merged_vs_unmerged.{fam}", r, lambda: (
            f"{label}: merged vs unmerged output differ by {diff.max():.3g}, beyond the sum of their bounds "
            f"(ratio {r:.3g})"))


def _roundtrip(ctx: CheckContext, layer: torch.nn.Module, method: str, params: dict[str, Any], label: str,
               w0: torch.Tensor, b0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """merge + unmerge; returns (|W2 - W0| bound, W2, b2) after checking the bookkeeping."""
    step(ctx, layer, "merge", label)
    wt, we, bt, be = numerics.merge_target(layer, method, "default", params, w0, b0)
    wb1 = qbounds.weight_bound(layer.base_layer)
    first = wb1 + we
    w1, b1 = numerics.base_weights(layer.base_layer)
    step(ctx, layer, "unmerge", label)
    ctx.check(not layer.merged and list(layer.merged_adapters) == [],
              f"{label}: after unmerge() merged={layer.merged}, merged_adapters={list(layer.merged_adapters)}")
    bound = numerics.roundtrip_bound(layer, method, "default", params, first, w1, qbounds.weight_bound(layer.base_layer),
                                     w0=w0, wb1=wb1)
    w2, b2 = numerics.base_weights(layer.base_layer)
    if b0 is not None and b1 is not None and be is not None:
        bias_bound = numerics.bias_roundtrip_bound(b0, be, layer.base_layer.bias.dtype)
        if not numerics.observed(b2, b0, bias_bound) <= 1.0:
            ctx.fail(f"{label}: bias after merge+unmerge differs from the original by "
                     f"{(b2 - b0).abs().max():.3g} > bound {bias_bound.max():.3g}")
    return bound, w2, b2


@check("MERGE-ROUNDTRIP")
def check_roundtrip(ctx: CheckContext) -> None:
    @_property(ctx, ctx.budget.property_examples)
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        method, bits, case, params = _draw_case(ctx, data)
        if method == "lora":
            params = {**params, "lora_bias": data.draw(st.booleans(), label="lora_bias")}
        label = _label(method, case, params)
        with ctx.case(label, isolate=False):
            layer = _build(ctx, method, case, params, seed=_seed(label))
            with torch.no_grad():
                w0, b0 = numerics.base_weights(layer.base_layer)
                bound, w2, _ = _roundtrip(ctx, layer, method, params, label, w0, b0)
            ratio, i = numerics.worst((w2 - w0).abs(), bound)

            def moved() -> str:
                return (f"{label}: merge+unmerge moved weight {divmod(i, w0.shape[1])} by "
                        f"{(w2 - w0).abs().flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} (ratio {ratio:.3g})")

            ctx.bounded(f"ratio.roundtrip.{method}.{bits}bit", ratio, moved)

    prop()


@check("MERGE-CYCLES")
def check_cycles(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        # quant types x double quant; square and non-square and the storage dtypes alternate over them
        variants = ([cases.BaseCase(4, *cases.ORIENTATION_SHAPES[i % 2], quant_type=q, double_quant=dq,
                                    weight_dtype=cases.STORAGE_DTYPES[i % len(cases.STORAGE_DTYPES)])
                     for i, (q, dq) in enumerate(itertools.product(cases.QUANT_TYPES, (False, True)))]
                    if bits == 4 else [cases.BaseCase(8), cases.BaseCase(8, *cases.ORIENTATION_SHAPES[1],
                                                                          weight_dtype=torch.bfloat16)])
        for case in variants:
            with ctx.case(_label(method, case, dict(acase.params))):
                params = dict(acase.params)
                label = _label(method, case, params)
                layer = _build(ctx, method, case, params, seed=_seed(label))
                with torch.no_grad():
                    w0, b0 = numerics.base_weights(layer.base_layer)
                    w_prev, b_prev = w0, b0
                    total = torch.zeros_like(w0)
                    first = None
                    for k in range(1, CYCLES + 1):
                        bound, w_k, b_k = _roundtrip(ctx, layer, method, params, f"{label} cycle {k}", w_prev, b_prev)
                        total = total + bound
                        first = bound if first is None else first
                        drift = (w_k - w0).abs()
                        fam = f"{method}.{case.label.split(f'-b{case.blocksize}-')[0] if bits == 4 else case.label}"
                        ctx.measure_max(f"drift_over_cycle1_bound.{fam}.k{k}", numerics.max_ratio(drift, first))
                        ctx.measure_max(f"drift_max.{fam}.k{k}", float(drift.max()))
                        ratio = numerics.max_ratio(drift, total)
                        ctx.bounded(f"ratio.cycles.{method}.{bits}bit", ratio, lambda: (
                            f"{label}: after {k} merge/unmerge cycles the weight drifted {drift.max():.3g}, beyond "
                            f"the sum of {k} cycle bounds (ratio {ratio:.3g})"))
                        w_prev, b_prev = w_k, b_k


def _check_rounding_warning(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():  # one case per family
        with ctx.case(f"{method} {bits}-bit"):
            layer = _build(ctx, method, cases.BaseCase(bits), dict(cases.adapter_cases(method)[0].params))
            with recorded_warnings() as caught:
                layer.merge()
            got = user_warnings(caught)
            ctx.measure(f"warnings.{method}.{bits}bit", got)
            if not any(w_ in t.lower() for t in got for w_ in ROUNDING_WORDS):
                ctx.fail(f"{bits}-bit: merge() of a {method} adapter emitted no UserWarning naming rounding or "
                         f"quantization; warnings: {warning_texts(caught)}")


@check("MERGE-WARNS-LORA")
def check_warns_lora(ctx: CheckContext) -> None:
    _check_rounding_warning(ctx)  # LoRA and DoRA (PEFT merges DoRA through the same bnb merge, warning alike)


@check("MERGE-WARNS-OFT")
def check_warns_oft(ctx: CheckContext) -> None:
    _check_rounding_warning(ctx)


@check("MERGE-TWICE-WARNS")
def check_merge_twice(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():  # one case per family
        with ctx.case(f"{method} {bits}-bit"):
            layer = _build(ctx, method, cases.BaseCase(bits), dict(cases.adapter_cases(method)[0].params))
            with recorded_warnings():
                layer.merge()
            snap = qlayers.snapshot(layer.base_layer)
            before = list(layer.merged_adapters)
            with recorded_warnings() as caught:
                layer.merge()
            got = user_warnings(caught)
            label = f"{method} {bits}-bit"
            ctx.check(bool(got), f"{label}: second merge() emitted no UserWarning; warnings: {warning_texts(caught)}")
            diff = snap.differences(qlayers.snapshot(layer.base_layer))
            ctx.check(diff == [], f"{label}: second merge() changed the base layer ({diff})")
            ctx.check(list(layer.merged_adapters) == before,
                      f"{label}: merged_adapters {before} -> {list(layer.merged_adapters)} after a second merge()")


@check("MERGE-UNMERGE-NOTHING-WARNS")
def check_unmerge_nothing(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():  # one case per family
        with ctx.case(f"{method} {bits}-bit"):
            layer = _build(ctx, method, cases.BaseCase(bits), dict(cases.adapter_cases(method)[0].params))
            snap = qlayers.snapshot(layer.base_layer)
            with recorded_warnings() as caught:
                layer.unmerge()
            got = user_warnings(caught)
            label = f"{method} {bits}-bit"
            ctx.check(bool(got), f"{label}: unmerge() with nothing merged emitted no UserWarning; "
                      f"warnings: {warning_texts(caught)}")
            diff = snap.differences(qlayers.snapshot(layer.base_layer))
            ctx.check(diff == [], f"{label}: unmerge() with nothing merged changed the base layer ({diff})")


@check("MERGE-MULTI")
def check_merge_multi(ctx: CheckContext) -> None:
    for (method, bits), shape in itertools.product(list(ctx.cases()), cases.ORIENTATION_SHAPES):
        with ctx.case(f"{method} {bits}-bit {shape}"):
            acase = cases.adapter_cases(method)[0]
            case = cases.BaseCase(bits, *shape)
            label = f"{method} on {case.label}, active ['default', 'second']"
            # large OFT rotations, large DoRA deltas: the merged order must match the forward order (rotations do
            # not commute, nor do DoRA's rescalings: merged in reverse, dora/4bit fails too, ratio 1.2)
            scale = 6.0 if method == "oft" else (5.0 if method == "dora" else 1.0)
            layer = _build(ctx, method, case, dict(acase.params), seed=5)
            cases.fill_adapter(layer, "default", ctx.generator(5), scale=scale)
            layer.add_adapter("second", **acase.params)
            cases.fill_adapter(layer, "second", ctx.generator(6), scale=scale)
            if method == "dora":  # make_layer trains only the first adapter's magnitude
                cases.trained_magnitude(layer, "second", ctx.generator(7))
            layer.set_adapter(["default", "second"])
            x = ctx.randn(4, case.in_features, offset=2)
            with torch.no_grad():
                y_u = layer(x)
                w0, b0 = numerics.base_weights(layer.base_layer)
                ta = numerics.merge_target(layer, method, "default", acase.params, w0, b0)
                tb = numerics.merge_target(layer, method, "second", acase.params, w0, b0)
                if method == "dora":
                    # not additive: f_b (f_a (W0 + d_a) + d_b), each norm on the unmerged W0 (the forward's order
                    # and norms; numerics.merge.dora_pair_merged)
                    s = numerics.lora_scaling(acase.params)
                    target, arith = dora_pair_merged(layer.base_layer, w0, (layer.adapter_parameters("default"), s),
                                                     (layer.adapter_parameters("second"), s))
                    inter = torch.zeros_like(target)
                elif method == "lora":
                    target = w0 + (ta[0] - w0) + (tb[0] - w0)
                    # either order: first requantization of W0 + delta_first, then arithmetic of both
                    inter = torch.maximum(numerics.hypothetical_requant_bound(layer.base_layer, ta[0]),
                                          numerics.hypothetical_requant_bound(layer.base_layer, tb[0]))
                    arith = ta[1] + tb[1] + numerics.U32 * target.abs()
                else:
                    n_blocks, bs = numerics.oft_layout(case.in_features, acase.params)
                    ra = numerics.oft_rotation(layer.adapter_parameters("default"), n_blocks, bs)
                    rb = numerics.oft_rotation(layer.adapter_parameters("second"), n_blocks, bs)
                    # forward order: x R_a R_b  =>  merged weight W0 (R_a R_b)^T = (W0 R_b^T) R_a^T
                    target = w0 @ (ra @ rb).t()
                    # the intermediate requantization (and first arithmetic) error passes through the
                    # second rotation; the order an implementation merges in is its own business
                    inter = torch.maximum(
                        (numerics.hypothetical_requant_bound(layer.base_layer, tb[0]) + tb[1]) @ ra.t().abs(),
                        (numerics.hypothetical_requant_bound(layer.base_layer, ta[0]) + ta[1]) @ rb.t().abs())
                    arith = ta[1] + tb[1] + numerics.U32 * target.abs()
                step(ctx, layer, "merge", label)
                merged = list(layer.merged_adapters)
                ctx.check(sorted(merged) == ["default", "second"],
                          f"{label}: merged_adapters after merge() is {merged}, expected both adapters once")
                err = qbounds.weight_bound(layer.base_layer) + arith + inter
                exp_m = numerics.linear_expected(layer.base_layer, x, x.dtype, weight=target, weight_err=err)
                y_m = layer(x)
            ctx.bounded(f"ratio.multi.{method}.{bits}bit", exp_m.ratio(y_m), lambda: (
                f"{label}: merged output is not the stacked adapters' output: {exp_m.describe(y_m)} "
                f"(max |merged - unmerged| {(y_m.double() - y_u.double()).abs().max():.3g})"))


@check("MERGE-SUBSET")
def check_merge_subset(ctx: CheckContext) -> None:
    for (method, bits), shape in itertools.product(list(ctx.cases()), cases.ORIENTATION_SHAPES):
        with ctx.case(f"{method} {bits}-bit {shape}"):
            acase = cases.adapter_cases(method)[0]
            case = cases.BaseCase(bits, *shape)
            layer = _build(ctx, method, case, dict(acase.params), seed=7)
            layer.add_adapter("other", **acase.params)
            cases.fill_adapter(layer, "other", ctx.generator(8))
            if method == "dora":  # make_layer trains only the first adapter's magnitude
                cases.trained_magnitude(layer, "other", ctx.generator(9))
            label = f"{method} on {case.label}, active ['default'], merge(adapter_names=['other'])"
            x = ctx.randn(4, case.in_features, offset=3)
            with torch.no_grad():
                w0, b0 = numerics.base_weights(layer.base_layer)
                step(ctx, layer, "merge", label, adapter_names=["other"])
                ctx.check(list(layer.merged_adapters) == ["other"],
                          f"{label}: merged_adapters is {list(layer.merged_adapters)}, expected ['other']")
                exp, _ = _merged_expected(layer, method, "other", acase.params, x, w0, b0)
                y = layer(x)
            r = exp.ratio(y)
            ctx.bounded(f"ratio.subset.{method}.{bits}bit", r,
                        lambda: f"{label}: the merged weights are not W0 + 'other' alone: {exp.describe(y)}")


@check("MERGE-LORA-BIAS")
def check_lora_bias(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        for case in _bias_cases(bits):
            with ctx.case(case.label):
                dt = case.compute_dtype
                params = cases.adapter_cases("lora")[0].with_params(lora_bias=True).params
                label = _label("lora", case, params)
                layer = _build(ctx, "lora", case, params, seed=9)
                x = ctx.randn(4, case.in_features, dtype=dt, offset=4)
                with torch.no_grad():
                    exp_u = numerics.layer_expected(layer, "lora", "default", params, x)
                    y_u = layer(x)  # also settles the bias dtype (bnb casts it to the input dtype)
                    w0, b0 = numerics.base_weights(layer.base_layer)
                    step(ctx, layer, "merge", label)
                    _, _, bt, be = numerics.merge_target(layer, "lora", "default", params, w0, b0)
                    _, b1 = numerics.base_weights(layer.base_layer)
                    assert bt is not None and be is not None and b1 is not None
                    exp_m, _ = _merged_expected(layer, "lora", "default", params, x, w0, b0)
                    exp_s = numerics.base_expected(layer.base_layer, x)  # the stored (merged) weights and bias, exactly
                    y_m = layer(x)

                    def unscaled() -> str:
                        bb = layer.adapter_parameters("default")["lora_B.bias"].detach().double().cpu()
                        return (f"{label}: merged bias is not b + scaling*b_B (scaling {numerics.lora_scaling(params)}): "
                                f"max |diff| {(b1 - bt).abs().max():.3g} > bound {be.max():.3g}; "
                                f"|b_merged - (b + b_B)| = {float((b1 - (b0 + bb)).abs().max()):.3g}")

                    ctx.bounded(f"ratio.bias.{bits}bit", numerics.observed(b1, bt, be), unscaled)
                # the merged layer's output is the unmerged one's (a bias merged and still added, or merged
                # but not added, shows here even when the stored bias is right)
                gap = (y_m.double() - y_u.double()).abs().cpu().reshape(exp_u.bound.shape)
                r = numerics.max_ratio(gap, exp_u.bound + exp_m.bound)
                r_s = exp_s.ratio(y_m)
                ctx.bounded(f"ratio.bias_merged_vs_stored.{bits}bit", r_s, lambda: (
                    f"{label}: the merged layer's output is not its base's (stored weights and merged bias): "
                    f"{exp_s.describe(y_m)}"))
                ctx.bounded(f"ratio.bias_merged_vs_unmerged.{bits}bit", r, lambda: (
                    f"{label}: merged vs unmerged output differ by {gap.max():.3g}, beyond the sum of their bounds "
                    f"(ratio {r:.3g}); merged output vs its oracle: {exp_m.describe(y_m)}"))


@check("MERGE-KEEPS-QUANT-SETTINGS")
def check_keeps_settings(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        for case, what in itertools.product(_settings_cases(ctx, bits),
                                            ("merge", "unmerge") if ctx.has("unmerge") else ("merge",)):
            label = f"{method} on {case.label} after {what}()"
            # each step from a freshly built layer: a merge that breaks the base does not hide what unmerge does
            with ctx.case(label, known=merge_known(ctx, case)):
                layer = _build(ctx, method, case, dict(acase.params))
                before = qlayers.quant_settings(layer.base_layer)
                dtypes = qvalidate.stored_dtypes(layer.base_layer)
                cls = type(layer.base_layer)
                with recorded_warnings():
                    if what == "unmerge":
                        layer.merge()  # what the merge left is MERGE-*'s business; this case checks the unmerge
                    getattr(layer, what)()
                ctx.check(type(layer.base_layer) is cls,
                          f"{label}: base layer became {type(layer.base_layer).__name__}, was {cls.__name__}")
                after = qlayers.quant_settings(layer.base_layer)
                changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
                if changed:
                    ctx.fail(f"{label}: quantization settings changed {changed}")
                now = qvalidate.stored_dtypes(layer.base_layer)
                moved = {k: (v, now.get(k)) for k, v in dtypes.items() if now.get(k) != v}
                if moved:
                    ctx.fail(f"{label}: storage dtypes changed {moved}")
                bad = qvalidate.base_problems(layer.base_layer, qvalidate.Expected(bits, case.out_features,
                                                                                   case.in_features))
                ctx.check(not bad, f"{label}: the base is no valid quantized layer: {'; '.join(bad)}")
