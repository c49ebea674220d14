"""Lifecycle clauses: the states after a merge (disabled, deleted, subset merged and unmerged, merge after an
eval forward or a training step) and which tensors require grad after set_adapter / add_adapter.

Every weight comparison uses ``conformance.numerics`` (merge targets, round-trip bounds) and
``conformance.quant.weight_bound`` of the layer state after a requantization. DoRA's merge is not additive
(``f (W0 + s B A)``, ``f = m / ||W0 + s B A||_c``): its target is ``numerics.merge_target``'s and its round trip
``numerics.roundtrip_bound``'s DoRA branch, which needs the weight merged into and the first requantization's bound apart
(the unmerge divides by the very factor the merge used, PEFT's cached norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses import cases, ownership
from conformance.clauses.clause import check
from conformance.clauses.lifecycle.declare import STEP_LR
from conformance.clauses.observe import recorded_warnings
from conformance.numerics import dora as ndora
from conformance.quant import bounds as qbounds

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


@dataclass
class Merged:
    """What one merge of adapter ``name`` should have done: W0/b0 before, the exact target, the bound on
    |W1 - target| (requantization + arithmetic) and W1 as stored after it."""

    name: str
    w0: torch.Tensor
    b0: torch.Tensor | None
    target: torch.Tensor
    first: torch.Tensor
    w1: torch.Tensor
    #: the adapter's tensors at merge time (the round-trip bound needs them after a delete_adapter too)
    tensors: dict[str, torch.Tensor]
    #: ``weight_bound`` of the layer after the merge (the first requantization alone: DoRA's round trip needs it)
    wb1: torch.Tensor


@dataclass
class _Frozen:
    """A layer's base plus one adapter's saved tensors: what ``numerics.roundtrip_bound`` reads."""

    base_layer: torch.nn.Module
    tensors: dict[str, torch.Tensor]

    def adapter_parameters(self, name: str) -> dict[str, torch.Tensor]:
        return self.tensors


def _params(method: str) -> dict[str, Any]:
    return dict(cases.adapter_cases(method)[0].params)


#: adapter value scale (``cases.fill_adapter``): the delta must dwarf the 4-bit requantization bound, or "the base
#: holds W0" and "the base holds W0 + delta" cannot be told apart
SCALE = 8.0


def _build(ctx: CheckContext, method: str, bits: int, seed: int = 0, other: bool = False) -> torch.nn.Module:
    case = cases.BaseCase(bits)
    base = ctx.make_base(case, seed=ctx.seed + seed)
    layer = ctx.make_layer(base, method, **_params(method))
    cases.fill_adapter(layer, "default", ctx.generator(200 + seed), scale=SCALE)
    if other:
        layer.add_adapter("other", **_params(method))
        cases.fill_adapter(layer, "other", ctx.generator(300 + seed), scale=SCALE)
    return layer


def _merge(layer: torch.nn.Module, method: str, name: str, **kwargs: Any) -> Merged:
    w0, b0 = numerics.base_weights(layer.base_layer)
    with recorded_warnings():
        layer.merge(**kwargs)
    wt, we, _, _ = numerics.merge_target(layer, method, name, _params(method), w0, b0)
    w1, _ = numerics.base_weights(layer.base_layer)
    saved = _tensors(layer, name)
    assert saved is not None
    wb1 = qbounds.weight_bound(layer.base_layer)
    return Merged(name, w0, b0, wt, wb1 + we, w1, saved, wb1)


def _roundtrip_bound(layer: torch.nn.Module, method: str, m: Merged) -> torch.Tensor:
    """Bound on |W after unmerge - W0| (``numerics.roundtrip_bound``; DoRA's needs the weight merged into and the
    first requantization's bound apart: the unmerge divides by the very factor the merge computed)."""
    return numerics.roundtrip_bound(_Frozen(layer.base_layer, m.tensors), method, m.name, _params(method), m.first,
                                    m.w1, qbounds.weight_bound(layer.base_layer), w0=m.w0, wb1=m.wb1)


def _state(layer: torch.nn.Module, method: str, m: Merged) -> tuple[bool, bool]:
    """(the base holds W0 within the round-trip bound, the base holds the merge target within its bound)."""
    w, _ = numerics.base_weights(layer.base_layer)
    back = numerics.observed(w, m.w0, _roundtrip_bound(layer, method, m)) <= 1.0
    still = numerics.observed(w, m.target, m.first) <= 1.0
    return back, still


def _tensors(layer: torch.nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    try:
        return {k: v.detach().clone() for k, v in layer.adapter_parameters(name).items()}
    except (KeyError, AttributeError, ValueError):
        return None


def _same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@check("LIFECYCLE-MERGED-DISABLED")
def check_merged_disabled(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        label = f"{method} {bits}-bit, merge() then enable_adapters(False)"
        layer = _build(ctx, method, bits)
        x = ctx.randn(4, 64, offset=1)
        with torch.no_grad():
            m = _merge(layer, method, "default")
            with recorded_warnings():
                layer.enable_adapters(False)
                y = layer(x)
            back, still = _state(layer, method, m)
            merged, names = bool(layer.merged), list(layer.merged_adapters)
            if back and (merged or names):
                ctx.fail(f"{label}: the base weight is back at W0 but merged={merged}, merged_adapters={names}")
            if still and not (merged and names == ["default"]):
                ctx.fail(f"{label}: the base still holds the delta but merged={merged}, merged_adapters={names}")
            if not back and not still:
                ctx.fail(f"{label}: the base weight is neither W0 (round-trip bound) nor W0 + delta (merge bound)")
            # the loose comparison with W0 (4-bit requantization noise is of the order of the delta at the output) ...
            rt = _roundtrip_bound(layer, method, m)
            exp = numerics.linear_expected(layer.base_layer, x, x.dtype, weight=m.w0, weight_err=rt, bias=m.b0)
            ctx.bounded(f"ratio.disabled.{method}.{bits}bit", exp.ratio(y), lambda: (
                f"{label}: the forward is not the base output without the adapter: {exp.describe(y)}"))
            # ... and the sharp one with the base layer as it is stored now (no requantization bound)
            cur = numerics.base_expected(layer.base_layer, x)
            r_cur = cur.ratio(y)
            if back and not still:
                ctx.bounded(f"ratio.disabled_vs_stored_base.{method}.{bits}bit", r_cur, lambda: (
                    f"{label}: unmerged, but the forward is not the base layer's output: {cur.describe(y)}"))
            elif still and not back and r_cur <= 1.0:
                ctx.fail(f"{label}: the base still holds the delta and the forward returns its output (ratio "
                         f"{r_cur:.3g} to the stored base's forward): the merged adapter is still applied")
            with recorded_warnings():
                layer.enable_adapters(True)
                y2 = layer(x)
            if layer.merged:
                exp2 = numerics.base_expected(layer.base_layer, x)  # the stored (merged) weights
            else:
                exp2 = numerics.layer_expected(layer, method, "default", _params(method), x)
            ctx.bounded(f"ratio.reenabled.{method}.{bits}bit", exp2.ratio(y2), lambda: (
                f"{label}, then enable_adapters(True) (merged={layer.merged}): {exp2.describe(y2)}"))


@check("LIFECYCLE-MERGED-DELETE")
def check_merged_delete(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        label = f"{method} {bits}-bit, merge() then delete_adapter('default')"
        layer = _build(ctx, method, bits, seed=1, other=True)
        with torch.no_grad():
            m = _merge(layer, method, "default")
            before = _tensors(layer, "default")
            names_before = list(layer.merged_adapters)
            try:
                with recorded_warnings():
                    layer.delete_adapter("default")
            except Exception as e:  # noqa: BLE001 - refusing is allowed, with nothing changed
                w, _ = numerics.base_weights(layer.base_layer)
                ctx.measure(f"refused.{method}.{bits}bit", type(e).__name__)
                ctx.check(torch.equal(w, m.w1), f"{label} raised {type(e).__name__} but changed the base weight")
                ctx.check(list(layer.merged_adapters) == names_before,
                          f"{label} raised but merged_adapters went {names_before} -> {list(layer.merged_adapters)}")
                ctx.check(_same(before, _tensors(layer, "default")),
                          f"{label} raised but the adapter's tensors changed or are gone")
                continue
            back, still = _state(layer, method, m)
            names = list(layer.merged_adapters)
            if still or not back:
                ctx.fail(f"{label}: the adapter is deleted but its delta stays in the base weight "
                         f"(merged={bool(layer.merged)}, merged_adapters={names}); unmerge first or refuse")
            ctx.check("default" not in names and not layer.merged,
                      f"{label}: deleted and unmerged, but merged={bool(layer.merged)}, merged_adapters={names}")


@check("LIFECYCLE-SUBSET-UNMERGE")
def check_subset_unmerge(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for active, subset in ((["default"], ["other"]), (["default", "other"], ["default"])):
            if len(active) > 1 and not ctx.require_case("additive_adapters", f"active {active}"):
                continue
            with ctx.case(f"{method} {bits}-bit, active {active}, merge(adapter_names={subset})"):
                label = f"{method} {bits}-bit, active {active}, merge(adapter_names={subset}) then unmerge()"
                layer = _build(ctx, method, bits, seed=2, other=True)
                layer.set_adapter(active)
                x = ctx.randn(4, 64, offset=2)
                with torch.no_grad():
                    kept = {n: _tensors(layer, n) for n in ("default", "other")}
                    m = _merge(layer, method, subset[0], adapter_names=subset)
                    ctx.check(list(layer.merged_adapters) == subset,
                              f"{label}: merged_adapters {list(layer.merged_adapters)} after the merge")
                    with recorded_warnings():
                        layer.unmerge()
                    ctx.check(not layer.merged and list(layer.merged_adapters) == [],
                              f"{label}: merged={bool(layer.merged)}, merged_adapters={list(layer.merged_adapters)}")
                    w, _ = numerics.base_weights(layer.base_layer)
                    rt = _roundtrip_bound(layer, method, m)
                    ctx.bounded(f"ratio.subset_roundtrip.{method}.{bits}bit", numerics.observed(w, m.w0, rt), lambda: (
                        f"{label}: the base weight moved {(w - m.w0).abs().max():.3g} beyond the round-trip bound"))
                    for n, t in kept.items():
                        ctx.check(_same(t, _tensors(layer, n)), f"{label}: adapter {n!r}'s tensors changed")
                    if method == "dora" and len(active) > 1:
                        # several active DoRA adapters compose in sequence (PEFT: each one's base term is the
                        # output so far): the forward of the whole active set after the unmerge
                        s = numerics.lora_scaling(_params(method))
                        order = list(layer.active_adapters)
                        exp_all = ndora.dora_stack_expected(
                            layer.base_layer, [(layer.adapter_parameters(n), s) for n in order], x)
                        y_all = layer(x)
                        ctx.bounded(f"ratio.subset_stack_forward.{method}.{bits}bit", exp_all.ratio(y_all),
                                    lambda: f"{label}: the forward of {order} afterwards: {exp_all.describe(y_all)}")
                    layer.set_adapter("default")
                    y = layer(x)
                    exp = numerics.layer_expected(layer, method, "default", _params(method), x)
                ctx.bounded(f"ratio.subset_forward.{method}.{bits}bit", exp.ratio(y),
                            lambda: f"{label}: the forward of 'default' afterwards: {exp.describe(y)}")


def _check_merged_forward(ctx: CheckContext, layer: torch.nn.Module, method: str, bits: int, label: str,
                          key: str) -> None:
    x = ctx.randn(4, 64, offset=3)
    layer.eval()
    with torch.no_grad():
        m = _merge(layer, method, "default")
        r_w = numerics.observed(m.w1, m.target, m.first)
        ctx.bounded(f"ratio.{key}_weight.{method}.{bits}bit", r_w, lambda: (
            f"{label}: the merged weight is not W0 + the adapter's current delta (max |W - target| "
            f"{(m.w1 - m.target).abs().max():.3g}, ratio {r_w:.3g})"))
        exp = numerics.linear_expected(layer.base_layer, x, x.dtype, weight=m.target, weight_err=m.first, bias=m.b0)
        y = layer(x)
    ctx.bounded(f"ratio.{key}.{method}.{bits}bit", exp.ratio(y),
                lambda: f"{label}: the merged output is not W0 + the adapter's current delta: {exp.describe(y)}")


@check("LIFECYCLE-MERGE-AFTER-EVAL")
def check_merge_after_eval(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        layer = _build(ctx, method, bits, seed=3)
        layer.eval()
        x = ctx.randn(4, 64, offset=4)
        with torch.no_grad():
            for _ in range(2):
                y = layer(x)
            exp = numerics.layer_expected(layer, method, "default", _params(method), x)
        label = f"{method} {bits}-bit, merge() after eval-mode forwards"
        ctx.bounded(f"ratio.eval_forward.{method}.{bits}bit", exp.ratio(y), lambda: f"{label}: {exp.describe(y)}")
        _check_merged_forward(ctx, layer, method, bits, label, "merge_after_eval")


@check("LIFECYCLE-MERGE-AFTER-STEP")
def check_merge_after_step(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        layer = _build(ctx, method, bits, seed=4)
        label = f"{method} {bits}-bit, merge() after a training step"
        layer.eval()
        with torch.no_grad():  # a forward before training: an implementation may cache what it computes here
            layer(ctx.randn(2, 64, offset=5))
        layer.train()
        before = _tensors(layer, "default")
        x = ctx.randn(4, 64, offset=6)
        loss = layer(x).float().square().mean()
        loss.backward()
        with torch.no_grad():
            for p in layer.adapter_parameters("default").values():
                if p.grad is not None:
                    p.sub_(STEP_LR * p.grad / p.grad.abs().max().clamp_min(1e-30) * p.abs().max().clamp_min(1e-3))
                    p.grad = None
        ctx.check(not _same(before, _tensors(layer, "default")),
                  f"{label}: the backward gave the adapter's tensors no gradient (nothing to merge changed)")
        _check_merged_forward(ctx, layer, method, bits, label, "merge_after_step")


def _flags(layer: torch.nn.Module, names: list[str]) -> dict[str, bool]:
    out = {}
    for n in names:
        for k, p in layer.adapter_parameters(n).items():
            out[f"{n}:{k}"] = bool(p.requires_grad)
    return out


@check("LIFECYCLE-TRAINABLE")
def check_trainable(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        layer = _build(ctx, method, bits, seed=5)
        label = f"{method} {bits}-bit"
        names = ["default"]

        def expect(step: str, active: list[str]) -> None:
            flags = _flags(layer, names)
            wrong = {k: v for k, v in flags.items() if v != (k.split(":")[0] in active)}
            if wrong:
                ctx.fail(f"{label}, after {step} (active {active}): requires_grad wrong for {wrong}")
            base = [n for n, p in ownership.base_parameters(layer, names) if p.requires_grad]
            if base:
                ctx.fail(f"{label}, after {step}: base-layer parameters require grad: {base}")

        expect("create", ["default"])
        layer.add_adapter("other", **_params(method))
        names.append("other")
        expect("add_adapter('other')", ["default"])
        layer.set_adapter("other")
        expect("set_adapter('other')", ["other"])
        if ctx.require_case("additive_adapters", "set_adapter(['default', 'other'])"):
            layer.set_adapter(["default", "other"])
            expect("set_adapter(['default', 'other'])", ["default", "other"])
        layer.set_adapter("default")
        expect("set_adapter('default')", ["default"])
