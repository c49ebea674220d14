"""Init clauses: LoRA initializations that read or rewrite a quantized base (``conformance.core.inits.TABLE``).

Every clause walks the same cases (each declared initialization x bit width x ``cases.BASES``), each case from a
fresh base: ``_start`` records what the base was (its validity record, bytes, dequantized weight and eval output, from
a copy so a cold base stays cold), ``_create`` asks the implementation for the adapter. A refusal or a crash at
creation is INIT-CREATE's to judge; the other clauses skip such a case, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses.attribution import CaseSkipped
from conformance.clauses.clause import check
from conformance.clauses.init import cases as icases
from conformance.clauses.interface import ImplementationUnsupported
from conformance.clauses.observe import recorded_warnings
from conformance.clauses.twin.checks import CAUSE_WORDS, REFUSALS
from conformance.core.inits import TABLE, Init, InitRule
from conformance.numerics.rounding import U32
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

NAME = "default"


@dataclass
class Start:
    """The base before the initialization, and the case's input."""

    base: torch.nn.Module
    record: Any  # quant.validate.Expected
    snap: qlayers.LayerSnapshot
    w0: torch.Tensor  # dequantized weight, float64
    #: |float16 weight - dequantized weight| of an 8-bit base with float16 weights (zeros otherwise): an
    #: initialization may decompose either (``quant.bounds.fp16_master_gap``), the bound adds the gap once
    gap: torch.Tensor
    wf: torch.Tensor  # the float weight it was quantized from
    x: torch.Tensor
    y0: torch.Tensor  # the original base's eval output
    e0: numerics.Expected  # its bound


@dataclass
class Made:
    """What create did: the layer, or why it refused (``refusal``) or crashed (``crash``)."""

    layer: torch.nn.Module | None
    refusal: str = ""
    crash: str = ""


def _inits(ctx: CheckContext, rules: tuple[InitRule, ...] = tuple(InitRule)) -> list[Init]:
    declared = [i for i, r in TABLE.items() if ctx.has(r.capability)]
    if not declared:
        ctx.skip(f"{ctx.impl.name} declares no initialization that reads the base "
                 f"(capabilities {', '.join(str(r.capability) for r in TABLE.values())})")
    return [i for i in declared if TABLE[i].rule in rules]


@dataclass(frozen=True)
class Case:
    init: Init
    bits: int
    index: int
    case: icases.InitCase

    @property
    def label(self) -> str:
        return f"{self.init} on {self.case.label}"


def _cases(ctx: CheckContext, rules: tuple[InitRule, ...] = tuple(InitRule)) -> list[Case]:
    """Every case of this clause: each declared initialization (of ``rules``) x bit width x base axis."""
    return [Case(init, bits, i, case) for init in _inits(ctx, rules) for _method, bits in ctx.cases()
            for i, case in enumerate(icases.BASES[bits])]


def _available(ctx: CheckContext, c: Case) -> None:
    """Skip the case where the implementation says the initialization cannot run on this device."""
    why = c.case.base.unavailable(ctx.device) or getattr(ctx.impl, "init_unavailable", lambda *_: None)(
        TABLE[c.init].value, ctx.device)
    if why:
        ctx.skip_this_case(why)


def _start(ctx: CheckContext, case: icases.InitCase, i: int) -> Start:
    wf = icases.float_weight(case, ctx.generator(offset=100 + i))
    base = ctx.make_base(case.base, weight=wf)
    x = icases.inputs(case, ctx.randn(icases.INPUT_ROWS, case.base.in_features, offset=i))
    base.eval()
    if case.warm:
        with torch.no_grad():
            base(x)
    original = qlayers.clone_layer(base)  # the original output, read from a copy: the base itself stays as it is
    original.eval()
    e0 = numerics.base_expected(original, x, training=False)
    with torch.no_grad():
        y0 = original(x)
    return Start(base, qvalidate.expected_of(base), qlayers.snapshot(base),
                 qlayers.dequantize(base).double().cpu(), qbounds.fp16_master_gap(base), wf, x, y0, e0)


def _create(ctx: CheckContext, init: Init, start: Start) -> Made:
    try:
        with recorded_warnings():
            layer = ctx.make_layer(start.base, "lora", **icases.params(init, start.wf))
    except (CaseSkipped, ImplementationUnsupported):
        raise  # the case does not apply (an undeclared option, or the implementation says it cannot): skipped
    except Exception as exc:  # noqa: BLE001 - every other exception at creation is judged (INIT-CREATE)
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, REFUSALS):
            return Made(None, refusal=text)
        return Made(None, crash=text)
    return Made(layer)


def _accepted(ctx: CheckContext, init: Init, start: Start, label: str) -> torch.nn.Module:
    """The layer over a valid base; a refusal or crash at creation, or a base that is no longer a valid quantized
    layer, skips the case (INIT-CREATE judges each)."""
    made = _create(ctx, init, start)
    if made.layer is None:
        what = "refused" if made.refusal else "raised"
        ctx.skip_this_case(f"{init} {what} at create ({made.refusal or made.crash}): INIT-CREATE judges it")
    bad = qvalidate.problems(made.layer, start.record)
    if bad:
        ctx.skip_this_case(f"{init} left no valid quantized base ({bad[0]}): INIT-CREATE judges it")
    tensors = made.layer.adapter_parameters(NAME)
    base = start.base
    for key, want in (("lora_A.weight", (icases.R, base.in_features)), ("lora_B.weight", (base.out_features, icases.R))):
        got = tuple(tensors[key].shape)
        ctx.check(got == want, f"{label}: {key} is {got}, expected {want} (r x in_features, out_features x r): the "
                               "initialization decomposed something else than the base weight")
    return made.layer


def _forward(ctx: CheckContext, layer: torch.nn.Module, x: torch.Tensor, label: str, what: str) -> torch.Tensor:
    try:
        with recorded_warnings(), torch.no_grad():
            y = layer(x)
    except Exception as exc:  # noqa: BLE001 - the implementation accepted the base: its forward must run
        ctx.fail(f"{label}: accepted the quantized base, then {what} raised {type(exc).__name__}: {exc}")
    ctx.check(bool(torch.isfinite(y).all()), f"{label}: {what} gives non-finite values")
    return y


@check("INIT-CREATE")
def check_create(ctx: CheckContext) -> None:
    tallies: dict[str, dict[str, int]] = {}
    for c in _cases(ctx):
        init, label = c.init, c.label
        with ctx.case(label):
            _available(ctx, c)
            tally = tallies.setdefault(f"outcomes.{init}.{c.bits}bit", {"works": 0, "refused": 0, "failed": 0})
            tally["failed"] += 1  # until the case gets to its end
            _create_case(ctx, c, tally)
    for key, tally in tallies.items():
        ctx.measure(key, tally)


def _create_case(ctx: CheckContext, c: Case, tally: dict[str, int]) -> None:
    init, label = c.init, c.label
    start = _start(ctx, c.case, c.index)
    made = _create(ctx, init, start)
    if made.crash:
        ctx.fail(f"{label}: create raised {made.crash} (a refusal is ValueError, TypeError or "
                 "NotImplementedError)")
    if made.layer is None:
        changed = start.snap.differences(qlayers.snapshot(start.base))
        if changed:
            ctx.fail(f"{label}: create refused ({made.refusal}) but changed the base: {', '.join(changed)}")
        ctx.note(f"{label}: refused ({made.refusal})")
        tally["failed"] -= 1
        tally["refused"] += 1
        return
    layer = made.layer
    bad = qvalidate.problems(layer, start.record)
    if bad:
        ctx.fail(f"{label}: the base is no longer the quantized layer it was: {'; '.join(bad)}")
    layer.eval()
    for what in ("the first eval forward", "the second eval forward"):
        y = _forward(ctx, layer, start.x, label, what)
        ctx.check(tuple(y.shape) == tuple(start.y0.shape),
                  f"{label}: {what} gives shape {tuple(y.shape)}, expected {tuple(start.y0.shape)}")
    tally["failed"] -= 1
    tally["works"] += 1


@check("INIT-NAMES")
def check_names(ctx: CheckContext) -> None:
    refusals = 0
    for c in _cases(ctx):
        with ctx.case(c.label):
            _available(ctx, c)
            made = _create(ctx, c.init, _start(ctx, c.case, c.index))
            if made.crash:
                ctx.skip_this_case(f"{c.init} raised {made.crash} at create, no refusal: INIT-CREATE judges it")
            if made.layer is not None:
                continue  # accepted: nothing to name
            refusals += 1
            kind, _, text = made.refusal.partition(": ")
            ctx.check(bool(text.strip()), f"{c.label}: refused with {kind} and no message")
            ctx.check(any(w in text.lower() for w in CAUSE_WORDS),
                      f"{c.label}: the refusal does not name its cause (the quantized layer type, bitsandbytes or "
                      f"quantization): {made.refusal}")
    ctx.measure("refusals", refusals)
    if not refusals:
        ctx.note("nothing refused at create: no refusal to name its cause")


def _delta(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(scaling * B A exact in float64, the bound on computing it in the adapter dtype, the adapter tensors)."""
    tensors = layer.adapter_parameters(NAME)
    params = icases.params(Init.PISSA)
    s = numerics.lora_scaling(params)
    return numerics.lora_delta(tensors, s), numerics.lora_delta_error(tensors, s), tensors


def residual_bound(layer: torch.nn.Module, start: Start) -> tuple[torch.Tensor, torch.Tensor]:
    """(|dequant(base) + s B A - W0|, its bound): the stored base's requantization bound (``weight_bound``: whatever
    float weight was handed to bitsandbytes, the stored one is this close to it) plus computing ``s B A`` in the
    adapter dtype and ``W0 - s B A`` in float32, plus the float16-weight gap where the base has one."""
    w0 = start.w0
    delta, delta_err, _ = _delta(layer)
    w1 = qlayers.dequantize(layer.base_layer).double().cpu()
    err = (w1 + delta - w0).abs()
    bound = (qbounds.weight_bound(layer.base_layer).double() + delta_err
             + U32 * (w0.abs() + start.gap + delta.abs() + delta_err) + start.gap)
    return err, bound


@check("INIT-RESIDUAL")
def check_residual(ctx: CheckContext) -> None:
    for c in _cases(ctx):
        with ctx.case(c.label):
            _available(ctx, c)
            _residual_case(ctx, c)


def _residual_case(ctx: CheckContext, c: Case) -> None:
    init, label = c.init, c.label
    start = _start(ctx, c.case, c.index)
    layer = _accepted(ctx, init, start, label)
    if TABLE[init].rule is InitRule.RESIDUAL:
        err, bound = residual_bound(layer, start)
        ctx.bounded(f"residual_ratio.{init}", numerics.max_ratio(err, bound), lambda: (
            f"{label}: dequant(base) + scaling * B A is not the original weight within the requantization "
            f"bound of the residual: max |diff| {float(err.max()):.3g}, bound there "
            f"{float(bound.flatten()[int((err / bound.clamp_min(1e-300)).argmax())]):.3g}"))
        return
    changed = start.snap.differences(qlayers.snapshot(layer.base_layer))
    ctx.check(not changed, f"{label}: {init} changed the base ({', '.join(changed)}); it fits the adapter to the "
                           "quantization error of the base as it is")
    delta, delta_err, _ = _delta(layer)
    gap = start.wf.double().cpu() - start.w0
    before, after = float(gap.norm()), float((gap - delta).norm())
    # Eckart-Young: no rank-r matrix fits the quantization error better than its truncated SVD
    best = float(torch.linalg.svdvals(gap)[icases.R:].norm())
    slack = float(delta_err.norm()) + U32 * float((start.w0.abs() + delta.abs()).norm())
    ctx.measure_max(f"quant_error_after_over_before.{init}", after / before if before else 0.0)
    ctx.bounded(f"quant_error_over_best.{init}", after / (best + slack) if best + slack else 0.0, lambda: (
        f"{label}: ||W - dequant(base) - scaling B A||_F = {after:.4g}, the best rank-{icases.R} fit leaves "
        f"{best:.4g} (+ rounding {slack:.3g}; without the adapter {before:.4g}): the adapter is not the low-rank fit "
        "of the quantization error"))


def _output_bound(layer: torch.nn.Module, start: Start) -> numerics.Expected:
    """The original output ``y0`` and the bound of the next forward's distance to it, read before that forward (a CPU
    packed base repacks at its first): the new layer's LoRA forward bound (to its exact output), the residual bound
    through ``|x|`` (exact new output to exact original output), the original base's forward bound (to ``y0``)."""
    new = numerics.lora_expected(layer, NAME, icases.params(Init.PISSA), start.x, training=False)
    _, res = residual_bound(layer, start)
    through = qbounds.output_bound(res, start.x)
    return numerics.Expected(start.y0.detach().double().cpu(), new.bound + through + start.e0.bound)


@check("INIT-OUTPUT")
def check_output(ctx: CheckContext) -> None:
    rules = (InitRule.RESIDUAL,)
    if any(TABLE[i].rule not in rules for i in _inits(ctx)):
        ctx.note("LoftQ changes the output at init by design (it fits the adapter to the quantization error): "
                 "INIT-RESIDUAL judges it")
    for c in _cases(ctx, rules):
        with ctx.case(c.label):
            _available(ctx, c)
            start = _start(ctx, c.case, c.index)
            layer = _accepted(ctx, c.init, start, c.label)
            layer.eval()
            for what in ("the first eval forward", "the second eval forward"):
                want = _output_bound(layer, start)
                got = _forward(ctx, layer, start.x, c.label, what)
                ctx.bounded(f"output_ratio.{c.init}", want.ratio(got), lambda want=want, got=got, what=what: (
                    f"{c.label}: {what} at init differs from the original base's output beyond the bound: "
                    f"{want.describe(got)}"))
