"""PATH-SEQUENCE: one adapter layer driven through the steps users run, on standard and CPU-packed bases.

Each step is its own case (``ctx.case``), so a failing step is reported and the next one still runs on the layer
as the failing step left it. Every oracle reads the base as bitsandbytes holds it right before the step
(``numerics`` reads it through ``quant.layers.dequantize``, which knows the packed layout, and models the packed
kernel's rounding when the forward takes it: ``quant.layers.forward_is_packed``). A step bitsandbytes itself
fails runs under its entry in ``xfails/bitsandbytes.ini`` (``ctx.known_upstream``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.merge.checks import _merged_expected, step
from conformance.clauses.paths.cases import ROTATES_INPUT, sequence_cases
from conformance.core import upstream
from conformance.quant import layers as qlayers

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext
    from conformance.core.upstream import KnownFailure

PACKED_STEPS = "steps_on_packed_layout"  #: measurement: steps that ran with the base in the CPU packed layout


def _count_packed(ctx: CheckContext, layer: torch.nn.Module) -> None:
    base = getattr(layer, "base_layer", None)
    if base is not None and qlayers.is_cpu_packed(base):
        ctx.measure(PACKED_STEPS, int(ctx.measurements.get(PACKED_STEPS, 0)) + 1)


def _forward(ctx: CheckContext, layer: torch.nn.Module, method: str, params: dict[str, Any], x: torch.Tensor,
             label: str, mode: Callable[[], Any], *, exp: numerics.Expected | None = None) -> None:
    """One eval-mode forward under ``mode`` checked against the oracle of the layer as it is now (or ``exp``)."""
    layer.eval()
    with torch.no_grad():
        want = exp if exp is not None else numerics.layer_expected(layer, method, "default", params, x)
    with mode():
        y = layer(x)
    ctx.check(tuple(y.shape) == (*x.shape[:-1], want.value.shape[-1]) and y.dtype == x.dtype,
              f"{label}: output {tuple(y.shape)} {y.dtype}, expected {(*x.shape[:-1], want.value.shape[-1])} {x.dtype}")
    ctx.bounded("ratio.forward", want.ratio(y), lambda: f"{label}: output outside the oracle bound {want.describe(y)}")


def _train(ctx: CheckContext, layer: torch.nn.Module, method: str, params: dict[str, Any], x: torch.Tensor,
           label: str, *, x_grad: bool) -> None:
    """A train-mode forward and backward: the output within the oracle bound, finite gradients."""
    layer.train()
    with torch.no_grad():
        want = numerics.layer_expected(layer, method, "default", params, x)
    xin = x.clone().requires_grad_(True) if x_grad else x
    y = layer(xin)
    ctx.bounded("ratio.train", want.ratio(y.detach()),
                lambda: f"{label}: output outside the oracle bound {want.describe(y.detach())}")
    y.float().sum().backward()
    trainable = {k: p for k, p in layer.adapter_parameters("default").items() if p.requires_grad}
    for k, p in trainable.items():
        ctx.check(p.grad is not None and bool(torch.isfinite(p.grad).all()), f"{label}: gradient of {k} is "
                  + ("missing" if p.grad is None else "not finite"))
        p.grad = None
    if x_grad:
        ctx.check(xin.grad is not None and xin.grad.shape == x.shape and bool(torch.isfinite(xin.grad).all()),
                  f"{label}: input gradient missing, misshapen or not finite")


def _delta(ctx: CheckContext, layer: torch.nn.Module, params: dict[str, Any], label: str) -> None:
    tensors = layer.adapter_parameters("default")
    s = numerics.lora_scaling(params)
    want = numerics.Expected(numerics.lora_delta(tensors, s), numerics.lora_delta_error(tensors, s))
    with torch.no_grad():
        got = layer.get_delta_weight("default")
    ctx.bounded("ratio.delta", want.ratio(got), lambda: f"{label}: get_delta_weight != scaling*B@A: {want.describe(got)}")


@check("PATH-SEQUENCE")
def check_sequence(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        params = acase.params
        for i, case in enumerate(sequence_cases(bits)):
            label = f"{acase.label} on {case.label}"
            built: list[torch.nn.Module] = []
            with ctx.case(f"{label}: build"):
                layer = ctx.make_layer(ctx.make_base(case, seed=ctx.seed + i), method, **params)
                cases.fill_adapter(layer, "default", ctx.generator(200 + i))
                built.append(layer)
            if not built:
                continue
            layer = built[0]
            x = ctx.randn(3, case.in_features, dtype=case.compute_dtype, offset=i)
            refused: KnownFailure | None = ctx.known_upstream(upstream.CPU_PACKED_SHAPE) if case.cpu_pack_refusal else None
            merged: dict[str, Any] = {}

            def run(what: str, body: Callable[[], None], known: KnownFailure | None = None) -> None:
                with ctx.case(f"{label}: {what}", known=known):
                    body()
                _count_packed(ctx, layer)

            run("first eval forward (no_grad)",
                lambda: _forward(ctx, layer, method, params, x, f"{label}, first eval forward", torch.no_grad),
                refused)
            run("second eval forward (no_grad)",
                lambda: _forward(ctx, layer, method, params, x, f"{label}, second eval forward", torch.no_grad),
                refused)
            run("eval forward (inference_mode)",
                lambda: _forward(ctx, layer, method, params, x, f"{label}, inference_mode forward",
                                 torch.inference_mode), refused)
            # bitsandbytes fails a train-mode forward on a repacked base whose *base* input requires grad
            packed_now = qlayers.is_cpu_packed(layer.base_layer)
            grad_known = ctx.known_upstream(upstream.CPU_PACKED_TRAIN_GRAD) if packed_now else None
            run("train forward and backward (input without grad)",
                lambda: _train(ctx, layer, method, params, x, f"{label}, train forward", x_grad=False),
                grad_known if method in ROTATES_INPUT else None)
            run("train forward and backward (input requires grad)",
                lambda: _train(ctx, layer, method, params, x, f"{label}, train forward (input grad)", x_grad=True),
                grad_known)
            layer.eval()
            if method == "lora":
                run("delta read after eval forwards", lambda: _delta(ctx, layer, params, f"{label}, delta"))
            def do_merge() -> None:
                with torch.no_grad():
                    w0, b0 = numerics.base_weights(layer.base_layer)
                    step(ctx, layer, "merge", f"{label}, merge after eval forwards")
                    ctx.check(bool(layer.merged), f"{label}: merged is False after merge()")
                    exp_m, err = _merged_expected(layer, method, "default", params, x, w0, b0)
                    wt = numerics.merge_target(layer, method, "default", params, w0, b0)[0]
                    w1, _ = numerics.base_weights(layer.base_layer)
                merged["exp"] = exp_m
                r_w = numerics.observed(w1, wt, err)
                ctx.bounded("ratio.merged_weight", r_w, lambda: (
                    f"{label}: merge after eval forwards: the merged weight is {float((w1 - wt).abs().max()):.3g} "
                    f"away from dequantize(base) + delta, beyond one requantization's bound (ratio {r_w:.3g})"))

            run("merge", do_merge)
            if "exp" in merged:
                run("eval forward of the merged layer",
                    lambda: _forward(ctx, layer, method, params, x, f"{label}, merged eval forward",
                                     torch.no_grad, exp=merged["exp"]), refused)
            if ctx.require_case("unmerge", label):
                def do_unmerge() -> None:
                    with torch.no_grad():
                        step(ctx, layer, "unmerge", f"{label}, unmerge")
                    ctx.check(not layer.merged, f"{label}: merged is True after unmerge()")

                run("unmerge", do_unmerge)
                run("eval forward after unmerge",
                    lambda: _forward(ctx, layer, method, params, x, f"{label}, eval forward after unmerge",
                                     torch.no_grad), refused)
