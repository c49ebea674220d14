"""Backprop through adapter layers on quantized bases: gradients vs float64, forward without grad.

PEFT (``peft/tuners/lora/bnb.py``: "As per Tim Dettmers, for 4bit, we need to defensively clone
here ... backprop does not work on a manipulated view"): training through a bitsandbytes base must
give the gradients of the math, for every input rank, dtype and batch layout; the probe
``python -m conformance probe clone`` asks whether the clone is still needed, these clauses ask
whether an implementation's gradients are right (whatever it does about the clone).

The float64 oracle and its componentwise error bound are ``conformance.numerics.grads`` (the error
model is in its docstring); the sampled case matrix is ``conformance.clauses.cases.grad_matrix``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance import numerics
from conformance.clauses.clause import check
from conformance.quant.torchnames import dtype_name, grad_mode

from ..cases import BASE, GradCase, grad_matrix

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


# --------------------------------------------------------------------------------------------------
# running one case against the implementation
# --------------------------------------------------------------------------------------------------
def _build(ctx: CheckContext, case: GradCase) -> tuple[nn.Module, dict[str, dict[str, Any]], list[str] | None]:
    base = ctx.make_base(case.base)
    layer = ctx.make_layer(base, case.method, **case.adapter.params)
    params = {"default": dict(case.adapter.params)}
    names = None
    if case.mixed:
        if ctx.has("multi_adapter") and ctx.has("additive_adapters") and case.second is not None:
            torch.manual_seed(ctx.seed + 1)
            layer.add_adapter("other", **case.second.params)
            params["other"] = dict(case.second.params)
            layer.set_adapter(["default", "other"])
            names = ["default", BASE, "other", "default"][: case.batch]
        else:
            names = ["default", BASE, "default", BASE][: case.batch]
    return layer, params, names


def _grad_case(ctx: CheckContext, case: GradCase, offset: int) -> float:
    """Forward + backward one case, compare output and gradients with the oracle; worst ratio."""
    layer, params, names = _build(ctx, case)
    state = numerics.read_state(layer, case.method, params)
    x = case.with_outliers(ctx.randn(*case.input_shape(), dtype=case.dtype, offset=offset))
    x.requires_grad_(case.x_requires_grad)
    try:
        y = layer(x) if names is None else layer(x, adapter_names=names)
        g = ctx.randn(*y.shape, dtype=y.dtype, offset=offset + 1)
        (y * g).sum().backward()
    except Exception as exc:  # noqa: BLE001  (an implementation's exception is the finding)
        ctx.fail(f"{case.label}: forward/backward raised {type(exc).__name__}: {exc}")
    _check_output(ctx, case, y, "")
    numerics.refresh_adapters(state, layer)
    active = list(params) if names is None else ["default"]
    exp = numerics.grad_expected(state, x, g, compute_dtype=case.dtype, names=names, active=active)
    worst = 0.0
    checks: list[tuple[str, torch.Tensor | None, torch.Tensor, torch.Tensor]] = [("output", y, exp.y, exp.y_bound)]
    if case.x_requires_grad:
        checks.append(("grad wrt input", x.grad, exp.grads["x"], exp.grad_bounds["x"]))
    for name in params:
        for key, p in layer.adapter_parameters(name).items():
            if not p.requires_grad:
                continue
            k = f"{name}:{key}"
            checks.append((f"grad wrt {k}", p.grad, exp.grads[k], exp.grad_bounds[k]))
    for what, got, e, bnd in checks:
        if got is None:
            if bool((e != 0).any()):
                ctx.fail(f"{case.label}: {what} is None (no gradient reached it), expected nonzero gradient")
            continue
        ratio, where = numerics.compare(got, e, bnd)
        worst = max(worst, ratio)
        if ratio > 1:
            ctx.fail(f"{case.label}: {what} differs from the float64 computation beyond the rounding bound "
                     f"(ratio {ratio:.3g}); {where}")
    return worst


def _check_output(ctx: CheckContext, case: GradCase, y: torch.Tensor, mode: str) -> None:
    """The output has the input's leading dims, ``out_features`` last and the input's dtype."""
    want = (*case.input_shape()[:-1], case.base.out_features)
    ctx.check(tuple(y.shape) == want and y.dtype == case.dtype,
              f"{case.label}: output{mode} {tuple(y.shape)} {y.dtype}, expected {want} {case.dtype} (the input's)")


def _run_matrix(ctx: CheckContext, mixed: bool) -> None:
    n = 0
    for method, bits in _method_bits(ctx):
        for i, case in enumerate(grad_matrix(method, bits, mixed=mixed)):
            if not all(ctx.supports(a.params, case.label) for a in (case.adapter, case.second) if a is not None):
                continue
            with ctx.case(case.label):
                ratio = _grad_case(ctx, case, offset=100 * i)
                dt = dtype_name(case.dtype)
                ctx.measure_max(f"{method}.{dt}.worst_ratio", ratio)
                if case.base.weight_dtype is not None:
                    ctx.measure_max(f"{method}.stored-{dtype_name(case.base.weight_dtype)}.worst_ratio", ratio)
                if case.adapter.params.get("lora_bias"):
                    ctx.measure_max("lora_bias.worst_ratio", ratio)
                if case.base.threshold:
                    ctx.measure_max(f"{method}.threshold{case.base.threshold:g}.worst_ratio", ratio)
                n += 1
    ctx.measure("cases", n)


def _method_bits(ctx: CheckContext) -> Iterator[tuple[str, list[int]]]:
    pairs = list(ctx.cases())
    for method in dict.fromkeys(m for m, _ in pairs):
        yield method, sorted(b for m, b in pairs if m == method)


@check("BACKPROP-GRAD-F64")
def check_grad_f64(ctx: CheckContext) -> None:
    _run_matrix(ctx, mixed=False)


@check("BACKPROP-MIXED-GRAD-F64")
def check_mixed_grad_f64(ctx: CheckContext) -> None:
    _run_matrix(ctx, mixed=True)


@check("BACKPROP-NOGRAD-FORWARD")
def check_nograd_forward(ctx: CheckContext) -> None:
    n = bitwise = 0
    for method, bits in _method_bits(ctx):
        for i, case in enumerate(grad_matrix(method, bits)):
            if not all(ctx.supports(a.params, case.label) for a in (case.adapter, case.second) if a is not None):
                continue
            with ctx.case(case.label):
                layer, params, _ = _build(ctx, case)
                state = numerics.read_state(layer, case.method, params)
                x = case.with_outliers(ctx.randn(*case.input_shape(), dtype=case.dtype, offset=100 * i))
                outs: dict[str, torch.Tensor] = {}
                for mode in ("inference_mode", "no_grad", "grad"):
                    xm = x.clone().requires_grad_(case.x_requires_grad and mode == "grad")
                    try:
                        if mode == "grad":
                            y = layer(xm)
                            y.sum().backward()
                        else:
                            with grad_mode(mode):
                                y = layer(xm)
                    except Exception as exc:  # noqa: BLE001
                        after = " after inference_mode/no_grad forwards" if mode == "grad" else ""
                        ctx.fail(f"{case.label}: forward under {mode}{after} raised {type(exc).__name__}: {exc}")
                    _check_output(ctx, case, y, f" under {mode}")
                    if mode != "grad" and y.requires_grad:
                        ctx.fail(f"{case.label}: output under {mode} requires grad (it must not build a graph)")
                    outs[mode] = y.detach().clone() if mode == "grad" else y.clone()
                numerics.refresh_adapters(state, layer)
                exp = numerics.grad_expected(state, x, torch.ones_like(outs["grad"]), compute_dtype=case.dtype)
                for mode in ("no_grad", "inference_mode"):
                    ratio, where = numerics.compare(outs[mode], outs["grad"].double(), 2 * exp.y_bound)
                    ctx.bounded(f"{method}.{mode}_vs_grad_ratio", ratio, lambda: (
                        f"{case.label}: output under {mode} differs from the grad-mode output beyond twice the "
                        f"rounding bound (ratio {ratio:.3g}); {where}"))
                    bitwise += int(torch.equal(outs[mode], outs["grad"]))
                n += 1
    ctx.measure("cases", n)
    ctx.measure("bitwise_equal_mode_outputs", bitwise)
    ctx.measure("mode_outputs_compared", 2 * n)
