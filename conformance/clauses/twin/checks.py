"""Twin clauses: each method on a bitsandbytes base against its dense twin (``conformance.clauses.twin.cases.Twin``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.merge.declare import ROUNDING_WORDS
from conformance.clauses.observe import recorded_warnings, user_warnings, warning_texts
from conformance.clauses.twin import cases as tcases
from conformance.core import upstream
from conformance.core.methods import TwinRule, row
from conformance.core.vocabulary import Method
from conformance.numerics import twin as ntwin
from conformance.numerics.rounding import cast_error, gamma_n
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: what a refusal at creation may raise (TWIN-CREATE)
REFUSALS = (ValueError, TypeError, NotImplementedError)
#: words a refusal names its cause with (TWIN-CREATE-NAMES)
CAUSE_WORDS = ("linear4bit", "linear8bitlt", "bitsandbytes", "bnb", "quantiz", "4bit", "8bit", "4-bit", "8-bit")


def _label(method: str, case: Any) -> str:
    return f"{method} on {case.label}"


def _x(ctx: CheckContext, case: Any, offset: int = 0) -> torch.Tensor:
    x = ctx.randn(tcases.INPUT_ROWS, case.in_features, dtype=case.compute_dtype, offset=offset)
    return cases.with_outliers(x, case.threshold) if case.threshold else x


def _create(ctx: CheckContext, method: str, case: Any, label: str) -> tuple[torch.nn.Module | None, str]:
    """The quantized layer (perturbed), or ``(None, refusal)`` when the implementation refused at creation; a
    refusal of another type, or one that touched the base, fails the case."""
    base = ctx.make_base(case)
    before = qlayers.snapshot(base)
    try:
        layer = ctx.make_layer(base, method, **_params_of(method))
    except Exception as exc:  # noqa: BLE001 - every exception at creation is judged here
        kind = type(exc).__name__
        if not isinstance(exc, REFUSALS):
            ctx.fail(f"{label}: create raised {kind}: {exc} (a refusal is ValueError, TypeError or "
                     "NotImplementedError)")
        changed = before.differences(qlayers.snapshot(base))
        if changed:
            ctx.fail(f"{label}: create refused ({kind}: {exc}) but changed the base: {'; '.join(changed)}")
        return None, f"{kind}: {exc}"
    tcases.perturb(layer, ctx.generator(offset=11))
    return layer, ""


def _created(ctx: CheckContext, method: str, case: Any, label: str) -> torch.nn.Module:
    """The perturbed quantized layer; a refusal at creation skips the case (TWIN-CREATE judges refusals)."""
    layer, why = _create(ctx, method, case, label)
    if layer is None:
        ctx.skip_this_case(f"{method} refused at create ({why}): TWIN-CREATE judges the refusal")
    return layer


def _step(ctx: CheckContext, label: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        with recorded_warnings():
            return fn()
    except Exception as exc:  # noqa: BLE001 - the implementation accepted the base: every step must run
        ctx.fail(f"{label}: accepted the quantized base at create, then {what} raised {type(exc).__name__}: {exc}")


def _valid(ctx: CheckContext, layer: torch.nn.Module, label: str, what: str, before: Any) -> None:
    if before is not None:
        bad = qvalidate.problems(layer, before)
        if bad:
            ctx.fail(f"{label}: after {what} the base is no valid quantized layer: " + "; ".join(bad))


def _finite(ctx: CheckContext, label: str, what: str, y: torch.Tensor, want: tuple[int, ...]) -> None:
    ctx.check(tuple(y.shape) == want, f"{label}: {what} gives shape {tuple(y.shape)}, expected {want}")
    ctx.check(bool(torch.isfinite(y).all()), f"{label}: {what} gives non-finite values")


def _targets(ctx: CheckContext, method: str) -> list[tuple[str, Callable[[str], bool]]]:
    """What family ``method`` builds: the method itself, or for ``other`` each of the implementation's other methods
    (``other_methods()``), each with what says whether it has an optional operation."""
    if method != "other":
        return [(method, lambda op: ctx.has(op, method))]
    others = getattr(ctx.impl, "other_methods", lambda: {})()
    if not others:
        ctx.skip(f"{ctx.impl.name} has no other methods (other_methods() is empty)")
    return [(name, lambda op, ops=frozenset(ops): op in ops) for name, ops in sorted(others.items())]


def _params_of(name: str) -> dict[str, Any]:
    return tcases.params(name) if name in {m.value for m in Method} else {}


@check("TWIN-CREATE")
def check_create(ctx: CheckContext) -> None:
    refused = 0
    for method, bits in ctx.cases():
        for name, has in _targets(ctx, method):
            tally = {"works": 0, "refused": 0, "failed": 0}
            for i, case in enumerate(tcases.BASES[bits]):
                label = _label(name, case)
                outcome = "failed"  # unless the case gets to its end
                with ctx.case(label):
                    layer, why = _create(ctx, name, case, label)
                    if layer is None:
                        refused += 1
                        outcome = "refused"
                        ctx.note(f"{label}: refused at create ({why})")
                    else:
                        _steps(ctx, layer, case, label, has, i)
                        outcome = "works"
                tally[outcome] += 1
            ctx.measure(f"outcomes.{name}.{bits}bit", tally)
    ctx.measure("refused", refused)


def _steps(ctx: CheckContext, layer: torch.nn.Module, case: Any, label: str, has: Callable[[str], bool],
           i: int) -> None:
    """Every step after create, in the order a user takes them; the first that raises fails the case, named."""
    x = _x(ctx, case, offset=i)
    want = (x.shape[0], case.out_features)
    layer.eval()
    with torch.no_grad():
        _finite(ctx, label, "the eval forward", _step(ctx, label, "the eval forward", lambda: layer(x)), want)
    layer.train()
    xg = x.clone().requires_grad_(True)
    y = _step(ctx, label, "the train forward", lambda: layer(xg))
    _finite(ctx, label, "the train forward", y, want)
    _step(ctx, label, "backward", lambda: y.float().square().sum().backward())
    ctx.check(xg.grad is not None and bool(torch.isfinite(xg.grad).all()),
              f"{label}: backward gives no finite input gradient")
    layer.eval()
    if not has("merge"):
        return
    before = qvalidate.expected_of(layer.base_layer, at_merge=True)
    _step(ctx, label, "merge()", lambda: layer.merge())
    _valid(ctx, layer, label, "merge()", before)
    with torch.no_grad():
        _finite(ctx, label, "the merged forward", _step(ctx, label, "the merged forward", lambda: layer(x)), want)
    if not has("unmerge"):
        return
    before = qvalidate.expected_of(layer.base_layer, at_merge=True)
    _step(ctx, label, "unmerge()", lambda: layer.unmerge())
    _valid(ctx, layer, label, "unmerge()", before)
    with torch.no_grad():
        _finite(ctx, label, "the forward after unmerge",
                _step(ctx, label, "the forward after unmerge", lambda: layer(x)), want)
    if has("safe_merge"):
        before = qvalidate.expected_of(layer.base_layer, at_merge=True)
        _step(ctx, label, "merge(safe_merge=True)", lambda: layer.merge(safe_merge=True))
        _valid(ctx, layer, label, "merge(safe_merge=True)", before)


@check("TWIN-CREATE-NAMES")
def check_create_names(ctx: CheckContext) -> None:
    refusals = 0
    for method, bits in ctx.cases():
        for name, _has in _targets(ctx, method):
            for case in tcases.BASES[bits]:
                label = _label(name, case)
                with ctx.case(label):
                    base = ctx.make_base(case)
                    try:
                        ctx.make_layer(base, name, **_params_of(name))
                    except Exception as exc:  # noqa: BLE001 - only a refusal is judged here
                        if not isinstance(exc, REFUSALS):
                            ctx.skip_this_case(f"{name} raised {type(exc).__name__} at create, no refusal: "
                                               "TWIN-CREATE judges it")
                        refusals += 1
                        text = str(exc).lower()
                        ctx.check(bool(text.strip()), f"{label}: refused with {type(exc).__name__} and no message")
                        ctx.check(any(w in text for w in CAUSE_WORDS),
                                  f"{label}: the refusal does not name its cause (the quantized layer type, "
                                  f"bitsandbytes or quantization): {type(exc).__name__}: {exc}")
    ctx.measure("refusals", refusals)
    if not refusals:
        ctx.note("nothing refused at create: no refusal to name its cause")


def _rule_cases(ctx: CheckContext, bits: int, tiered: bool = False) -> list[Any]:
    return list(ctx.base_matrix(bits)) if tiered else list(tcases.BASES[bits])


@check("TWIN-FORWARD")
def check_forward(ctx: CheckContext) -> None:
    """Each forward of a case is a case of its own (one layer through all of them), so a listed bitsandbytes failure
    (``xfails/bitsandbytes.ini`` cpu-packed-train-grad: once repacked, a forward whose input requires grad raises)
    ends only that step."""
    for method, bits in ctx.cases():
        sampled = row(method).sampled_training
        if sampled:
            ctx.note(f"{method}: eval-mode forwards only ({sampled})")
        steps: list[tuple[str, bool, bool]] = [
            ("eval, first no-grad forward", False, False), ("eval, second no-grad forward", False, False),
            ("eval, grad enabled", False, True)]
        if not sampled:
            steps += [("train, no grad", True, False), ("train, grad enabled", True, True)]
        for i, case in enumerate(_rule_cases(ctx, bits, tiered=True)):
            label = _label(method, case)
            built: list[tuple[torch.nn.Module, tcases.Twin]] = []
            with ctx.case(f"{label}: build"):
                layer = _created(ctx, method, case, label)
                built.append((layer, tcases.Twin.of(ctx, layer, method, label)))
            if not built:
                continue
            layer, twin = built[0]
            x = _x(ctx, case, offset=i)
            for what, training, grad in steps:
                packed = qlayers.bits_of(layer.base_layer) == 4 and qlayers.is_cpu_packed(layer.base_layer)
                known = ctx.known_upstream(upstream.CPU_PACKED_TRAIN_GRAD) if packed and grad else None
                with ctx.case(f"{label} ({what})", known=known):
                    _forward_step(ctx, layer, twin, x, f"{label} ({what})", method, bits, training, grad)


def _forward_step(ctx: CheckContext, layer: torch.nn.Module, twin: tcases.Twin, x: torch.Tensor, label: str,
                  method: str, bits: int, training: bool, grad: bool) -> None:
    layer.train(training)
    xin = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = _step(ctx, label, "the forward", lambda: layer(xin))
    exp = twin.expected(x, training)
    r = exp.ratio(y)
    ctx.bounded(f"ratio.{method}.{bits}bit", r, lambda: f"{label}: outside the twin bound {exp.describe(y)}")


@check("TWIN-BACKWARD")
def check_backward(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for i, case in enumerate(_rule_cases(ctx, bits)):
            label = _label(method, case)
            with ctx.case(label):
                layer = _created(ctx, method, case, label)
                twin = tcases.Twin.of(ctx, layer, method, label)
                layer.eval()
                x = _x(ctx, case, offset=i).requires_grad_(True)
                g = ctx.randn(x.shape[0], case.out_features, dtype=x.dtype, offset=i + 50)
                y = _step(ctx, label, "the forward", lambda: layer(x))
                _step(ctx, label, "backward", lambda: (y * g).sum().backward())
                exp = twin.grad_expected(g, x.dtype)
                ctx.check(x.grad is not None, f"{label}: no input gradient")
                r = exp.ratio(x.grad)
                ctx.bounded(f"ratio.grad_x.{method}.{bits}bit", r,
                            lambda: f"{label}: input gradient outside the twin bound {exp.describe(x.grad)}")
                xd = x.detach().double().cpu().requires_grad_(True)  # the twin lives on the CPU, in float64
                twin.dense.zero_grad(set_to_none=True)
                (twin.dense(xd) * g.detach().double().cpu()).sum().backward()
                mine = tcases.trainable(layer)  # the twin's own requires_grad flags are not the question here
                theirs = twin.dense.adapter_parameters(tcases.NAME)
                got = {k for k, t in mine.items() if t.grad is not None and bool(t.grad.any())}
                want = {k for k in mine if theirs[k].grad is not None and bool(theirs[k].grad.any())}
                ctx.check(got == want, f"{label}: adapter tensors with a gradient {sorted(got)}, on the dense twin "
                                       f"{sorted(want)}")
                if twin.rule is TwinRule.ADDITIVE:  # a graph of sums and products: its magnitude graph bounds it
                    _adapter_grads(ctx, label, method, bits, twin, mine, theirs, x, g, case)


def _adapter_grads(ctx: CheckContext, label: str, method: str, bits: int, twin: tcases.Twin,
                   mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor,
                   case: Any) -> None:
    """Each trainable adapter tensor's gradient within the magnitude-graph bound of the twin's
    (``numerics.twin.adapter_grad_bound``)."""
    keys = sorted(k for k, t in mine.items() if t.grad is not None)
    # the coarsest dtype the adapter path may compute in: its own or the input's (numerics.grads takes the same)
    d = max((twin.adapter_dtype, x.dtype), key=qbounds.unit_roundoff)
    if 2 * ntwin.chain_length(case.in_features, case.out_features) * qbounds.unit_roundoff(d) >= 1:
        ctx.note(f"{method}: adapter-gradient values compared only where the path computes in float32 or finer (in "
                 f"{d} the magnitude-graph bound is vacuous); which tensors get a gradient is checked everywhere")
        return
    mags = ntwin.magnitude_grads(twin.dense, x, g, keys)
    for k in keys:
        bound = ntwin.adapter_grad_bound(mags[k], case.in_features, case.out_features, d)
        want = theirs[k].grad.detach().double() if theirs[k].grad is not None else torch.zeros_like(bound)
        got = mine[k].grad.detach().double().cpu()
        r = numerics.observed(got, want, bound)
        ctx.bounded(f"ratio.grad_adapter.{method}.{bits}bit", r, lambda k=k, r=r, got=got, want=want: (
            f"{label}: the gradient of {k} is {float((got - want).abs().max()):.3g} from the dense twin's, beyond "
            f"the magnitude-graph bound (ratio {r:.3g})"))


def _merged(ctx: CheckContext, method: str, case: Any, label: str) -> tuple[Any, Any, torch.Tensor, Any] | None:
    """(layer, twin, original dequantized weight, bound on |stored merged - twin merged|) after both merged."""
    layer = _created(ctx, method, case, label)
    twin = tcases.Twin.of(ctx, layer, method, label)
    layer.eval()
    w0 = qlayers.dequantize(layer.base_layer).double().cpu()
    arith = twin.merge_error(w0)
    _step(ctx, label, "merge()", lambda: layer.merge())
    with recorded_warnings():
        twin.dense.merge()
    return layer, twin, w0, arith


@check("TWIN-MERGE")
def check_merge(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for case in _rule_cases(ctx, bits):
            label = _label(method, case)
            with ctx.case(label):
                layer, twin, _w0, arith = _merged(ctx, method, case, label)
                target = twin.dense.base_layer.weight.detach().double()
                w1 = qlayers.dequantize(layer.base_layer).double().cpu()
                err = qbounds.weight_bound(layer.base_layer).double().cpu() + arith
                r = numerics.observed(w1, target, err)
                ctx.bounded(f"ratio.merged_weight.{method}.{bits}bit", r, lambda: (
                    f"{label}: the merged weight dequantizes {float((w1 - target).abs().max()):.3g} away from the "
                    f"dense twin's merged weight, beyond one requantization plus the merge arithmetic (ratio {r:.3g})"))
                b1, bt = getattr(layer.base_layer, "bias", None), getattr(twin.dense.base_layer, "bias", None)
                if b1 is not None and bt is not None:
                    bt = bt.detach().double()
                    b_err = _bias_error(twin, bt, b1.dtype)
                    rb = numerics.observed(b1.detach().double().cpu(), bt, b_err)
                    ctx.bounded(f"ratio.merged_bias.{method}.{bits}bit", rb, lambda: (
                        f"{label}: the merged bias is {float((b1.double().cpu() - bt).abs().max()):.3g} away from the "
                        f"dense twin's (ratio {rb:.3g})"))


def _bias_error(twin: Any, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The merged bias's bound: its cast to the stored dtype, and for a transform rule ``S b`` in the adapter
    dtype."""
    err = cast_error(torch.float64, dtype) * b.abs()
    if twin.rule is TwinRule.TRANSFORM:
        s, _t, se, _te = twin.transforms
        mag = s.abs() @ b.abs()
        err = err + gamma_n(ntwin.nnz(s, 1), twin.adapter_dtype) * mag + se @ b.abs()
    return err


@check("TWIN-MERGE-WARNS")
def check_merge_warns(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for case in tcases.BASES[bits]:
            label = _label(method, case)
            with ctx.case(label):
                layer = _created(ctx, method, case, label)
                with recorded_warnings() as caught:  # _step would record (and hide) them itself
                    try:
                        layer.merge()
                    except Exception as exc:  # noqa: BLE001 - the step named, as _step names it
                        ctx.fail(f"{label}: accepted the quantized base at create, then merge() raised "
                                 f"{type(exc).__name__}: {exc}")
                got = user_warnings(caught)
                ctx.measure(f"warnings.{method}.{bits}bit", got)
                if not any(word in t.lower() for t in got for word in ROUNDING_WORDS):
                    ctx.fail(f"{label}: merge() emitted no UserWarning naming rounding or quantization; warnings: "
                             f"{warning_texts(caught)}")


@check("TWIN-UNMERGE")
def check_unmerge(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for case in _rule_cases(ctx, bits):
            label = _label(method, case)
            with ctx.case(label):
                layer, twin, w0, arith = _merged(ctx, method, case, label)
                err1 = qbounds.weight_bound(layer.base_layer).double().cpu() + arith
                _step(ctx, label, "unmerge()", lambda: layer.unmerge())
                ctx.check(not layer.merged, f"{label}: merged is still True after unmerge()")
                w2 = qlayers.dequantize(layer.base_layer).double().cpu()
                # unmerge: the requantized merged weight (within err1 of W0 + dW) minus the delta (its chain and the
                # subtraction in float32), requantized again
                err = err1 + twin.merge_error(w0) + qbounds.weight_bound(layer.base_layer).double().cpu()
                r = numerics.observed(w2, w0, err)
                ctx.bounded(f"ratio.roundtrip.{method}.{bits}bit", r, lambda: (
                    f"{label}: merge then unmerge leaves the weight {float((w2 - w0).abs().max()):.3g} away from the "
                    f"original, beyond two requantizations plus the arithmetic (ratio {r:.3g})"))


@check("TWIN-SAFE-MERGE")
def check_safe_merge(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for case in tcases.BASES[bits]:
            label = _label(method, case)
            with ctx.case(label):
                layer = _created(ctx, method, case, label)
                with torch.no_grad():
                    for t in tcases.trainable(layer).values():
                        t.view(-1)[0] = float("nan")
                before = qlayers.snapshot(layer.base_layer)
                try:
                    with recorded_warnings():
                        layer.merge(safe_merge=True)
                except ValueError:
                    pass
                except Exception as exc:  # noqa: BLE001 - the wrong refusal is the implementation's failure
                    ctx.fail(f"{label}: safe merge of a NaN adapter raised {type(exc).__name__}: {exc}, not "
                             "ValueError")
                else:
                    ctx.fail(f"{label}: merge(safe_merge=True) of an adapter with NaNs did not raise")
                changed = before.differences(qlayers.snapshot(layer.base_layer))
                ctx.check(not changed, f"{label}: the refused safe merge changed the base: {'; '.join(changed)}")
                ctx.check(not layer.merged, f"{label}: merged is True after a refused safe merge")
