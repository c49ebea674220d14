"""MOVE-DTYPE and MOVE-DEVICE: a whole-module dtype cast or device move keeps the quantized base or refuses
cleanly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.moves.cases import (
    BACK_TO_CPU,
    CASTS,
    REFUSAL_WORDS,
    TO_CPU,
    TO_CUDA,
    Move,
    device_move_cases,
    move_cases,
)
from conformance.core import upstream
from conformance.numerics.dora import MAGNITUDE
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_name

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: snapshot entries a cast may change: the bias is a floating parameter like any other
CASTABLE = ("bias",)


def _payload_changes(before: qlayers.LayerSnapshot, base: torch.nn.Module) -> list[str]:
    return [k for k in qlayers.snapshot(base).differences(before) if k not in CASTABLE]


def _check_magnitude_follows(ctx: CheckContext, label: str, layer: nn.Module, method: str, dtype: torch.dtype | None,
                             device: str | torch.device) -> None:
    """DoRA: the magnitude vector is moved and cast with the layer, as every floating parameter is
    (``Module._apply``): ``dtype`` after a cast (the dtype it had before, after a device move), on ``device``. A
    magnitude left behind would be promoted or moved in every forward, or fail there."""
    if method != "dora":
        return
    m = layer.adapter_parameters("default")[MAGNITUDE]
    ctx.check(m.dtype == dtype and m.device.type == torch.device(device).type,
              f"{label}: the DoRA magnitude did not follow the layer ({dtype_name(m.dtype)} on {m.device}, expected "
              f"{dtype_name(dtype)} on {device})")


def _check_refusal_names(ctx: CheckContext, label: str, exc: Exception) -> None:
    """A move refused: counted, and its message must name the quantized layer or its storage (``REFUSAL_WORDS``)."""
    ctx.measure("refused", int(ctx.measurements.get("refused", 0)) + 1)
    ctx.check(any(w.lower() in str(exc).lower() for w in REFUSAL_WORDS),
              f"{label}: refused with {type(exc).__name__} that names neither the quantized layer nor its storage: "
              f"{exc}")


@check("MOVE-DTYPE")
def check_dtype_moves(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        for i, case in enumerate(move_cases(ctx, bits)):
            storage = case.quant_storage or torch.uint8
            for j, (name, (cast, dtype)) in enumerate(CASTS.items()):
                label = f"{acase.label} on {case.label}, layer.{name}"
                # bitsandbytes casts a floating 4-bit payload like any floating tensor
                known = (ctx.known_upstream(upstream.FLOAT_STORAGE_CAST)
                         if bits == 4 and storage.is_floating_point and storage != dtype else None)
                with ctx.case(label, known=known):
                    layer = ctx.make_layer(ctx.make_base(case, seed=ctx.seed + i), method, **acase.params)
                    cases.fill_adapter(layer, "default", ctx.generator(300 + i))
                    layer.eval()
                    before = qlayers.snapshot(layer.base_layer)
                    dtypes = {k: p.dtype for k, p in layer.adapter_parameters("default").items()}
                    try:
                        moved = cast(layer)
                    except (TypeError, ValueError, NotImplementedError) as exc:
                        _check_refusal_names(ctx, label, exc)
                        changed = qlayers.snapshot(layer.base_layer).differences(before)
                        now = {k: p.dtype for k, p in layer.adapter_parameters("default").items()}
                        ctx.check(not changed and now == dtypes,
                                  f"{label}: refused, but the layer was changed ({changed or now})")
                        continue
                    base = moved.base_layer
                    _check_magnitude_follows(ctx, label, moved, method, dtype, moved.base_layer.weight.device)
                    changed = _payload_changes(before, base)
                    ctx.check(not changed, f"{label}: the cast changed the quantized base ({', '.join(changed)}; "
                                           f"payload stored as {dtype_name(storage)}, now {dtype_name(base.weight.dtype)})")
                    x = ctx.randn(3, case.in_features, dtype=dtype, offset=j)
                    if bits == 8 and case.threshold:  # the outlier path runs only on inputs that have outliers
                        x = cases.with_outliers(x, case.threshold)
                    with torch.no_grad():
                        want = numerics.layer_expected(moved, method, "default", acase.params, x)
                        y = moved(x)
                    ctx.check(tuple(y.shape) == (3, case.out_features) and y.dtype == dtype,
                              f"{label}: output {tuple(y.shape)} {y.dtype} for a {dtype_name(dtype)} input")
                    ctx.bounded(f"ratio.{bits}bit", want.ratio(y),
                                lambda: f"{label}: output after the cast outside the oracle bound {want.describe(y)}")


# -- MOVE-DEVICE ---------------------------------------------------------------------------------

def _adapter_values(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in layer.adapter_parameters("default").items()}


def _device_move(ctx: CheckContext, label: str, layer: nn.Module, move: Move, target: str, method: str,
                 params: dict[str, Any], x: torch.Tensor) -> nn.Module | None:
    """Make ``move`` on ``layer`` and check it: the quantized base means the same weight (the dequantized weight,
    read through ``quant.layers.standard_layout``, bit for bit; the raw bytes too where the layout did not change),
    every tensor is on ``target``, the adapters are kept, and a forward there is within the oracle bound; or the
    move refused cleanly. The moved layer, or None after a refusal. Both weights are read on the CPU from copies
    (``quant.layers.dequantize(on="cpu")``: the same kernel on both sides of a CPU<->CUDA move)."""
    base = layer.base_layer
    before = qlayers.snapshot(base)
    w_before = qlayers.dequantize(base, on="cpu")
    packed_before = qlayers.is_cpu_packed(base)
    adapters = _adapter_values(layer)
    m_dtype = layer.adapter_parameters("default")[MAGNITUDE].dtype if method == "dora" else None
    try:
        moved = move(layer)
    except (TypeError, ValueError, NotImplementedError) as exc:
        _check_refusal_names(ctx, label, exc)
        changed = qlayers.snapshot(layer.base_layer).differences(before)
        now = _adapter_values(layer)
        kept = now.keys() == adapters.keys() and all(torch.equal(now[k], adapters[k]) for k in now)
        ctx.check(not changed and kept and qlayers.is_cpu_packed(layer.base_layer) == packed_before,
                  f"{label}: refused, but the layer was changed ({', '.join(changed) or 'its adapters or layout'})")
        return None
    base = moved.base_layer
    off = qlayers.tensors_off_device(moved, target)
    ctx.check(not off, f"{label}: after the move, not on {target}: {'; '.join(off)}")
    _check_magnitude_follows(ctx, label, moved, method, m_dtype, target)
    w_after = qlayers.dequantize(base, on="cpu")
    ctx.check(w_after.shape == w_before.shape and torch.equal(w_after, w_before), (
        f"{label}: the move changed the dequantized weight (max |diff| "
        f"{(w_after - w_before).abs().max().item() if w_after.shape == w_before.shape else 'n/a'}; layout "
        f"{'CPU-packed' if packed_before else 'standard'} -> {'CPU-packed' if qlayers.is_cpu_packed(base) else 'standard'})"))
    if qlayers.is_cpu_packed(base) == packed_before:
        changed = qlayers.snapshot(base).differences(before)
        ctx.check(not changed, f"{label}: the move changed the quantized base ({', '.join(changed)})")
    now = _adapter_values(moved)
    ctx.check(now.keys() == adapters.keys() and all(torch.equal(now[k], adapters[k]) for k in now),
              f"{label}: the move changed the adapter tensors")
    xt = x.to(target)
    with torch.no_grad():
        want = numerics.layer_expected(moved, method, "default", params, xt)
        y = moved(xt)
    ctx.check(tuple(y.shape) == (*x.shape[:-1], base.out_features) and y.dtype == x.dtype
              and y.device.type == torch.device(target).type,
              f"{label}: output {tuple(y.shape)} {y.dtype} on {y.device} for a {dtype_name(x.dtype)} input on {target}")
    bits = qlayers.bits_of(base)
    ctx.bounded(f"ratio.{bits}bit.{torch.device(target).type}", want.ratio(y),
                lambda: f"{label}: output after the move outside the oracle bound {want.describe(y)}")
    return moved


def _cuda_unavailable(ctx: CheckContext, method: str) -> str | None:
    """Why the CUDA moves cannot run in this context (None when they can). A run on the CPU never touches CUDA
    (a CPU run on a GPU host must not: another check may have broken its context)."""
    if torch.device(ctx.device).type != "cuda":
        return f"CPU<->CUDA moves run under --device cuda (this run is on {ctx.device})"
    if not torch.cuda.is_available():
        return "CPU<->CUDA moves need CUDA: torch.cuda.is_available() is False"
    if not ctx.has("cuda", method):
        return f"{ctx.impl.name} does not declare capability cuda"
    return None


@check("MOVE-DEVICE")
def check_device_moves(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        plans = ([(name, move, None) for name, move in TO_CPU.items()]
                 + [(name, move, list(BACK_TO_CPU.items())[j % len(BACK_TO_CPU)])
                    for j, (name, move) in enumerate(TO_CUDA.items())])
        for i, case in enumerate(device_move_cases(bits)):
            for j, (name, move, back) in enumerate(plans):
                to_cuda = back is not None
                label = (f"{acase.label} on {case.label}, CPU eval forward, layer.{name}"
                         + (f", CUDA forward, layer.{back[0]}, CPU forward" if back else ", CPU forward"))
                known = None
                if to_cuda and bits == 8:  # the CPU forward filled layer.state (has_fp16_weights: its cached int8 form)
                    known = ctx.known_upstream(upstream.INT8_STATE_CUDA)
                with ctx.case(label, known=known):
                    why = case.unavailable("cpu") or (_cuda_unavailable(ctx, method) if to_cuda else None)
                    if why is not None:
                        ctx.skip_this_case(why)
                    layer = ctx.make_layer(case.build("cpu", seed=ctx.seed + i), method, **acase.params)
                    cases.fill_adapter(layer, "default", ctx.generator(300 + i))
                    layer.eval()
                    x = torch.randn(3, case.in_features, generator=ctx.generator(j)).to(case.compute_dtype)
                    if bits == 8 and case.threshold:
                        x = cases.with_outliers(x, case.threshold)
                    with torch.no_grad():  # an eval-mode no-grad forward: bitsandbytes repacks a cpu_packed base
                        want = numerics.layer_expected(layer, method, "default", acase.params, x)
                        y = layer(x)
                    ctx.bounded(f"ratio.{bits}bit.cpu", want.ratio(y),
                                lambda: f"{label}: the CPU forward before the move is outside the oracle bound "
                                        f"{want.describe(y)}")
                    ctx.measure("packed_before_move", int(ctx.measurements.get("packed_before_move", 0))
                                + int(qlayers.is_cpu_packed(layer.base_layer)))
                    moved = _device_move(ctx, f"{label} [the move]", layer, move, "cuda" if to_cuda else "cpu",
                                         method, acase.params, x)
                    if moved is not None and back is not None:
                        _device_move(ctx, f"{label} [the move back]", moved, back[1], "cpu", method,
                                     acase.params, x)
