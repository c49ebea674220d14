"""Dropout clauses: eval mode is exactly the dropout-0 layer; train mode is active; the mean of many train-mode
forwards lies within the Hoeffding bound of ``conformance.numerics.dropout``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.dropout.declare import ACTIVE_FORWARDS, DROPOUT_P, LORA_PARAMS, MEAN_FORWARDS, OFT_PARAMS
from conformance.core.vocabulary import LORA_LIKE
from conformance.numerics.dropout import dropout_mean
from conformance.quant import torchnames

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: eval-mode grad modes: (label, context manager factory), in ``torchnames.GRAD_MODES`` order (grad, no_grad, ...)
GRAD_MODES: tuple[tuple[str, Any], ...] = tuple(torchnames.GRAD_MODES.items())


def dropout_params(method: str, p: float) -> dict[str, Any]:
    """The area's adapter parameters with dropout ``p`` (LoRA and DoRA ``lora_dropout``, OFT ``module_dropout``)."""
    if method in LORA_LIKE:
        return {**LORA_PARAMS, "lora_dropout": p}
    return {**OFT_PARAMS, "module_dropout": p}


def base_cases(bits: int) -> list[cases.BaseCase]:
    """One float32 case per bit width and, for 4-bit, FP4 + double quant in bfloat16."""
    if bits == 8:
        return [cases.BaseCase(8)]
    return [cases.BaseCase(4), cases.BaseCase(4, quant_type="fp4", double_quant=True, compute_dtype=torch.bfloat16)]


def build(ctx: CheckContext, method: str, case: cases.BaseCase, p: float, seed: int = 0) -> torch.nn.Module:
    """A layer with dropout ``p`` over a seeded base, with seeded adapter values (the same for every ``p``)."""
    base = ctx.make_base(case, seed=ctx.seed + seed)
    layer = ctx.make_layer(base, method, **dropout_params(method, p))
    cases.fill_adapter(layer, "default", ctx.generator(100 + seed))
    return layer


def probe_input(ctx: CheckContext, case: cases.BaseCase, offset: int = 0) -> torch.Tensor:
    """Rows that make the mean test sharp plus dense rows: 6 scaled one-hot rows (one input feature each, spread over
    the OFT blocks, so a row's random part has one term) and 2 dense random rows."""
    n = case.in_features
    eye = torch.zeros(6, n)
    for k, i in enumerate(range(0, n, max(n // 6, 1))[:6]):
        eye[k, i] = 1.5 if k % 2 == 0 else -1.5
    dense = torch.randn(2, n, generator=ctx.generator(offset))
    return torch.cat([eye, dense]).to(device=ctx.device, dtype=case.compute_dtype)


def _label(method: str, case: cases.BaseCase, p: float) -> str:
    return f"{method} dropout={p} on {case.label}"


@check("DROPOUT-EVAL-EXACT")
def check_eval_exact(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for i, case in enumerate(base_cases(bits)):
            with ctx.case(_label(method, case, DROPOUT_P)):
                label = _label(method, case, DROPOUT_P)
                layer = build(ctx, method, case, DROPOUT_P, seed=i)
                ref = build(ctx, method, case, 0.0, seed=i)
                layer.eval()
                ref.eval()
                x = ctx.randn(4, case.in_features, dtype=case.compute_dtype, offset=i)
                with torch.no_grad():
                    y_ref = ref(x)
                    exp = numerics.layer_expected(ref, method, "default", dropout_params(method, 0.0), x)
                for mode, manager in GRAD_MODES:
                    with manager():
                        y = layer(x)
                    if not torch.equal(y, y_ref):
                        diff = (y.double() - y_ref.double()).abs().max().item()
                        ctx.fail(f"{label}, eval mode, {mode}: the output is not the dropout-0 layer's output "
                                 f"(max |diff| {diff:.3g}): dropout is active in eval mode")
                    ctx.bounded(f"ratio.eval.{method}.{bits}bit", exp.ratio(y),
                                lambda: f"{label}, eval mode, {mode}: outside the oracle bound {exp.describe(y)}")


@check("DROPOUT-TRAIN-ACTIVE")
def check_train_active(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        case = base_cases(bits)[0]
        label = _label(method, case, DROPOUT_P)
        layer = build(ctx, method, case, DROPOUT_P)
        layer.train()
        x = ctx.randn(4, case.in_features, dtype=case.compute_dtype, offset=5)
        exp = numerics.layer_expected(layer, method, "default", dropout_params(method, 0.0), x, training=True)
        for mode, manager in GRAD_MODES[:2]:
            outs, least = [], float("inf")
            for k in range(ACTIVE_FORWARDS):
                with manager():
                    y = layer(x).detach()
                outs.append(y)
                r = exp.ratio(y)
                least = min(least, r)
                ctx.measure(f"least_ratio_to_dropout_free.{method}.{bits}bit.{mode}", least)
                if r <= 1.0:
                    ctx.fail(f"{label}, train mode, {mode}: forward {k + 1} of {ACTIVE_FORWARDS} equals the "
                             f"dropout-free output within its bound (ratio {r:.3g}): dropout is not applied")
            if all(torch.equal(outs[0], o) for o in outs[1:]):
                ctx.fail(f"{label}, train mode, {mode}: {ACTIVE_FORWARDS} forwards are identical: the dropout mask "
                         "does not change between forwards")


def _mean_expected(layer: torch.nn.Module, method: str, x: torch.Tensor) -> numerics.DropoutMean:
    return dropout_mean(layer, method, "default", dropout_params(method, DROPOUT_P), x)


@check("DROPOUT-TRAIN-MEAN")
def check_train_mean(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        case = base_cases(bits)[0]
        label = _label(method, case, DROPOUT_P)
        layer = build(ctx, method, case, DROPOUT_P, seed=1)
        layer.train()
        x = probe_input(ctx, case, offset=6)
        torch.manual_seed(ctx.seed + 17)  # the masks: a fixed seed makes a failure reproducible
        total = torch.zeros(x.shape[0], case.out_features, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(MEAN_FORWARDS):
                total += layer(x).double().cpu()
        mean = total / MEAN_FORWARDS
        exp = _mean_expected(layer, method, x)
        bound = exp.bound(MEAN_FORWARDS)
        r = exp.ratio(mean, MEAN_FORWARDS)

        def where() -> str:
            err = (mean - exp.value).abs()
            rr, i = numerics.worst(err, bound)
            row, col = divmod(i, err.shape[1])
            return (f"{label}, train mode: the mean of {MEAN_FORWARDS} forwards at ({row}, {col}) is "
                    f"{float(mean.flatten()[i]):.6g}, expected {float(exp.value.flatten()[i]):.6g} "
                    f"(|diff| {float(err.flatten()[i]):.3g} > bound {float(bound.flatten()[i]):.3g}, ratio {rr:.3g}; "
                    f"false-alarm rate {numerics.FALSE_ALARM:g}): dropout is not unbiased "
                    + ("(int(p*D) of the D blocks become the identity)" if method == "oft" else
                       "(inverted dropout rescales the kept inputs by 1/(1-p))"))

        ctx.bounded(f"ratio.mean.{method}.{bits}bit", r, where)
