"""Forward clauses: identity at init, float64 oracle, LoRA delta, mixed batches, disabled adapters, bad input."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses import cases, ownership
from conformance.clauses.clause import check
from conformance.clauses.observe import recorded_warnings
from conformance.numerics import dora as ndora
from conformance.numerics.dora import MAGNITUDE
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_name

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

INPUT_SHAPES = cases.INPUT_LEADS  # leading dims: 1-D, 2-D, 3-D inputs
#: FWD-INIT-IDENTITY's adapter: every other parameter at the implementation's default
INIT_PARAMS: dict[str, Any] = {"r": 4}


def _base(ctx: CheckContext, case: cases.BaseCase, seed_offset: int = 0) -> torch.nn.Module:
    return ctx.make_base(case, seed=ctx.seed + seed_offset)


def _x(ctx: CheckContext, lead: tuple[int, ...], n: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    return ctx.randn(*lead, n, dtype=dtype, offset=offset)


def _forward_cases(ctx: CheckContext, bits: int) -> list[cases.BaseCase]:
    """The base-layer matrix (``cases.BASE_AXES``: shapes square and not, quant types, blocksizes, double quant,
    compute and storage dtypes, float quant storages, bitsandbytes' CPU packed layout, whose first eval-mode forward
    repacks the base; the 8-bit outlier threshold, whose inputs carry outlier columns: ``with_outliers``), every pair
    of values by default, the full product in the slow tier (``CheckContext.base_matrix``)."""
    return ctx.base_matrix(bits)


def check_output(ctx: CheckContext, label: str, y: torch.Tensor, lead: tuple[int, ...], out_features: int,
                 dtype: torch.dtype) -> None:
    """A forward's output has the input's leading dims, ``out_features`` last and the input's dtype (as the
    bitsandbytes base layer's own output has)."""
    want = (*lead, out_features)
    ctx.check(tuple(y.shape) == want and y.dtype == dtype,
              f"{label}: output {tuple(y.shape)} {y.dtype}, expected {want} {dtype} (the input's dtype)")


@check("FWD-INIT-IDENTITY")
def check_init_identity(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for i, case in enumerate(_forward_cases(ctx, bits)):
            lead = INPUT_SHAPES[i % len(INPUT_SHAPES)]
            label = f"{method} on {case.label}, input {(*lead, case.in_features)}"
            with ctx.case(label):
                base = _base(ctx, case)
                x = _x(ctx, lead, case.in_features, case.compute_dtype, offset=i)
                if case.threshold:
                    x = cases.with_outliers(x, case.threshold)
                with torch.no_grad():
                    # bnb's CUDA int8 matmul rejects 1-D inputs: the base output of a 1-D input is its one row
                    y0 = (base(x.unsqueeze(0)).squeeze(0) if x.dim() == 1 else base(x)).clone()
                    layer = ctx.make_layer(base, method, **INIT_PARAMS)
                    y = layer(x)
                ctx.check(y.shape == y0.shape and y.dtype == y0.dtype,
                          f"{label}: output {tuple(y.shape)} {y.dtype}, base gives {tuple(y0.shape)} {y0.dtype}")
                if method == "dora":
                    _check_dora_init(ctx, label, layer, x, y, y0, bits)
                elif not torch.equal(y, y0):
                    diff = (y.double() - y0.double()).abs().max().item()
                    ctx.fail(f"{label}: default-initialised adapter changes the output (max |diff| {diff:.3g}); "
                             "expected exactly the base output")


def _init_norm_dtype(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], bits: int) -> torch.dtype:
    """The coarsest dtype the initial magnitude may have been computed or stored in: its own, the adapter's and
    the dequantized base weight's (PEFT 0.21.2 ``DoraLinearLayer.update_layer`` takes the norm of
    ``dequantize_module_weight(base)`` in that weight's dtype and keeps it in it)."""
    base = layer.base_layer
    dtypes = [tensors[MAGNITUDE].dtype, tensors["lora_A.weight"].dtype]
    if bits == 4:
        dtypes.append(qlayers.weight_dtype_of(base))
    elif qlayers.has_fp16_weights(base):
        dtypes.append(base.weight.dtype)
    return max(dtypes, key=qbounds.unit_roundoff)


def _check_dora_init(ctx: CheckContext, label: str, layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     y0: torch.Tensor, bits: int) -> None:
    """DoRA's default initialisation: ``s B A = 0`` exactly and the magnitude the row norms ``||W0||_c`` within the
    bound of computing them (``numerics.dora.norm_expected``); the forward then leaves the base output unchanged
    within ``dora_expected``'s bound (with ``B = 0`` only the ``(m/n - 1) T`` term remains, zero up to rounding: the
    forward recomputes ``n`` and need not round it as the initialisation did)."""
    tensors = {k: v.detach() for k, v in layer.adapter_parameters("default").items()}
    s = numerics.lora_scaling(INIT_PARAMS)  # B = 0 is checked exactly: the scaling does not enter the bound
    delta = numerics.lora_delta(tensors, s)
    ctx.check(bool((delta == 0).all()), f"{label}: default init has s*B@A != 0 (max |s*B@A| "
              f"{delta.abs().max():.3g}); DoRA's default init (B = 0) starts at the identity")
    w0 = qlayers.dequantize(layer.base_layer)
    d = _init_norm_dtype(layer, tensors, bits)
    norm = ndora.norm_expected(w0, tensors, s, d)
    m = tensors[MAGNITUDE].double().cpu()
    r_m = numerics.observed(m, norm.value, norm.bound)
    ctx.bounded(f"ratio.init_magnitude.dora.{bits}bit", r_m, lambda: (
        f"{label}: the initial magnitude is not ||W0 + s B A||_c (max |m - n| {(m - norm.value).abs().max():.3g}, "
        f"{r_m:.3g} x the bound of computing the norm in {dtype_name(d)})"))
    exp = numerics.layer_expected(layer, "dora", "default", INIT_PARAMS, x)
    ctx.bounded(f"ratio.init.dora.{bits}bit", exp.ratio(y), lambda: (
        f"{label}: default-initialised DoRA changes the output beyond the bound of its (m/n - 1) rounding term: "
        f"{exp.describe(y)}"))
    ctx.measure("dora_bit_identical", int(ctx.measurements.get("dora_bit_identical", 0)) + int(torch.equal(y, y0)))


@check("FWD-ORACLE")
def check_oracle(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for ai, acase in enumerate(cases.adapter_cases(method)):
            for i, case in enumerate(_forward_cases(ctx, bits)):
                modes = (True, False) if bits == 8 or case.cpu_packed else (True,)
                for training in modes:
                    if not ctx.supports(acase.params, f"{acase.label} on {case.label}"):
                        continue  # counted per case
                    lead = INPUT_SHAPES[(i + ai) % len(INPUT_SHAPES)]
                    if bits == 8 and not training and not lead:
                        # bitsandbytes 0.50 MatMul8bitLt (eval) fails on 1-D inputs (IndexError in
                        # int8_vectorwise_quant); not the adapter's doing, so eval uses 2-D/3-D inputs
                        lead = (2,)
                    label = (f"{acase.label} on {case.label} ({'train' if training else 'eval'}), "
                             f"input {(*lead, case.in_features)}")
                    with ctx.case(label):
                        base = _base(ctx, case)
                        layer = ctx.make_layer(base, method, **acase.params)
                        cases.fill_adapter(layer, "default", ctx.generator(100 + i))
                        layer.train(training)
                        x = _x(ctx, lead, case.in_features, case.compute_dtype, offset=i)
                        if case.threshold:
                            x = cases.with_outliers(x, case.threshold)
                        with torch.no_grad():
                            exp = numerics.layer_expected(layer, method, "default", acase.params, x)
                            y = layer(x)
                        check_output(ctx, label, y, lead, case.out_features, case.compute_dtype)
                        r = exp.ratio(y)
                        if case.threshold:  # the outlier columns bitsandbytes found (eval mode: MatMul8bitLt)
                            idx = getattr(layer.base_layer.state, "idx", None)
                            ctx.measure("outlier_columns", int(ctx.measurements.get("outlier_columns", 0))
                                        + (0 if idx is None else int(idx.numel())))
                        if case.cpu_packed and not training:  # the second eval forward runs on the repacked base
                            with torch.no_grad():
                                exp2 = numerics.layer_expected(layer, method, "default", acase.params, x)
                            with torch.inference_mode():
                                y2 = layer(x)
                            check_output(ctx, f"{label}, second forward", y2, lead, case.out_features,
                                         case.compute_dtype)
                            r = max(r, exp2.ratio(y2))
                            ctx.measure("forwards_on_packed_layout",
                                        int(ctx.measurements.get("forwards_on_packed_layout", 0))
                                        + int(qlayers.is_cpu_packed(layer.base_layer)))
                        if case.weight_dtype is not None:
                            ctx.measure_max(f"ratio.{method}.{bits}bit.stored-{dtype_name(case.weight_dtype)}", r)
                        if acase.params.get("lora_bias"):
                            ctx.measure_max(f"ratio.lora_bias.{bits}bit", r)
                        ctx.bounded(f"ratio.{method}.{bits}bit.{dtype_name(case.compute_dtype)}", r,
                                    lambda: f"{label}: output outside the oracle bound {exp.describe(y)}")


@check("FWD-LORA-DELTA")
def check_lora_delta(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        # a transposed delta has the right shape on the square layer and crashes on the non-square one
        for shape, (j, r) in itertools.product(cases.ORIENTATION_SHAPES, enumerate(cases.RANKS)):
            base_case = cases.BaseCase(bits, *shape)
            for alpha in cases.ALPHAS:
                for rs in (False, True):
                    params: dict[str, Any] = {"r": r, "lora_alpha": alpha, "init_lora_weights": False,
                                              "use_rslora": rs}
                    if not ctx.supports(params, f"{method} r={r} rslora={rs}"):
                        continue
                    label = f"{method} r={r} alpha={alpha} rslora={rs} ({bits}-bit, {shape[0]}->{shape[1]})"
                    with ctx.case(label):
                        layer = ctx.make_layer(_base(ctx, base_case), method, **params)
                        cases.fill_adapter(layer, "default", ctx.generator(j))
                        tensors = layer.adapter_parameters("default")
                        s = numerics.lora_scaling(params)
                        want = numerics.Expected(numerics.lora_delta(tensors, s),
                                                 numerics.lora_delta_error(tensors, s))
                        with torch.no_grad():
                            got = layer.get_delta_weight("default")
                        ctx.check(tuple(got.shape) == (base_case.out_features, base_case.in_features),
                                  f"{label}: delta shape {tuple(got.shape)}")
                        ctx.bounded("ratio.delta", want.ratio(got), lambda: (
                            f"{label}: get_delta_weight != scaling*B@A with scaling {s:.6g}: {want.describe(got)}"))


@check("FWD-MIXED-BATCH")
def check_mixed_batch(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        for case in (cases.BaseCase(bits), cases.BaseCase(bits, 48, 64, compute_dtype=torch.float16)):
            label = f"{method} on {case.label}"
            with ctx.case(label):
                base = _base(ctx, case)
                layer = ctx.make_layer(base, method, **acase.params)
                layer.add_adapter("other", **acase.params)
                cases.fill_adapter(layer, "default", ctx.generator(1))
                cases.fill_adapter(layer, "other", ctx.generator(2))
                names = ["default", "__base__", "other", "default", "other", "__base__"]
                x = _x(ctx, (len(names), 2), case.in_features, case.compute_dtype)
                with torch.no_grad():
                    y = layer(x, adapter_names=names)
                check_output(ctx, f"{label}, mixed batch", y, (len(names), 2), case.out_features, case.compute_dtype)
                for k, name in enumerate(names):
                    xs = x[k:k + 1]
                    with torch.no_grad():
                        if name == "__base__":
                            exp = numerics.base_expected(layer.base_layer, xs)
                            single = ownership.base_output(layer, xs, ["default", "other"])
                        else:
                            layer.set_adapter(name)
                            exp = numerics.layer_expected(layer, method, name, acase.params, xs)
                            single = layer(xs)
                    ratio_m = exp.ratio(y[k:k + 1])
                    ratio_s = exp.ratio(single)
                    ctx.bounded("ratio.mixed", ratio_m, lambda: (
                        f"{label}: sample {k} ({name!r}) of the mixed batch is outside the bound of its "
                        f"single-adapter forward: {exp.describe(y[k:k + 1])}"))
                    diff = (y[k:k + 1].double() - single.double()).abs().cpu()
                    ctx.check(numerics.max_ratio(diff.reshape(exp.bound.shape), 2 * exp.bound) <= 1.0 and ratio_s <= 1.0,
                              f"{label}: sample {k} ({name!r}): mixed vs single forward differ by {diff.max():.3g}")
                layer.set_adapter("default")


@check("FWD-DISABLED")
def check_disabled(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        square = cases.BaseCase(bits, *cases.ORIENTATION_SHAPES[1], compute_dtype=torch.float16,
                                weight_dtype=torch.float16)
        for case in (cases.BaseCase(bits), square):
            label = f"{acase.label} on {case.label}"
            with ctx.case(label):
                base = _base(ctx, case)
                layer = ctx.make_layer(base, method, **acase.params)
                cases.fill_adapter(layer, "default", ctx.generator(3))
                x = _x(ctx, (4,), case.in_features, case.compute_dtype)
                with torch.no_grad():
                    y_on = layer(x)
                    layer.enable_adapters(False)
                    y_off = layer(x)
                    y_base = ownership.base_output(layer, x)
                    layer.enable_adapters(True)
                    y_on2 = layer(x)
                    exp = numerics.layer_expected(layer, method, "default", acase.params, x)
                for what, y in (("enabled", y_on), ("disabled", y_off), ("re-enabled", y_on2)):
                    check_output(ctx, f"{label} ({what})", y, (4,), case.out_features, case.compute_dtype)
                if not torch.equal(y_off, y_base):
                    ctx.fail(f"{label}: disabled adapters still change the output "
                             f"(max |diff| {(y_off.double() - y_base.double()).abs().max():.3g})")
                ctx.check(not torch.equal(y_on, y_off), f"{label}: the adapter had no effect even when enabled")
                ctx.check(exp.ratio(y_on2) <= 1.0, f"{label}: after enable_adapters(True): {exp.describe(y_on2)}")


def _expect_error(
    ctx: CheckContext, label: str, fn: Any, kinds: tuple[type[BaseException], ...], needles: list[str]
) -> str:
    """Call fn; it must raise one of ``kinds`` whose message contains one of ``needles``."""
    try:
        with recorded_warnings():
            fn()
    except kinds as exc:
        msg = str(exc)
        if not any(n.lower() in msg.lower() for n in needles):
            ctx.fail(f"{label}: {type(exc).__name__} raised, but its message does not name the problem "
                     f"(expected one of {needles}): {msg!r}")
        return type(exc).__name__
    except Exception as exc:
        ctx.fail(f"{label}: raised {type(exc).__name__} ({exc}), expected {'/'.join(k.__name__ for k in kinds)}")
    ctx.fail(f"{label}: no error raised")
    return ""


@check("FWD-ERR-SHAPE")
def check_err_shape(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        case = cases.BaseCase(bits)
        layer = ctx.make_layer(_base(ctx, case), method, **cases.adapter_cases(method)[0].params)
        for bad in (case.in_features - 1, case.in_features + 16):
            with ctx.case(f"{method} {bits}-bit, input (3, {bad})"):
                x = ctx.randn(3, bad)
                got = _expect_error(ctx, f"{method} {bits}-bit, input (3, {bad}) for in_features={case.in_features}",
                                    lambda x=x, layer=layer: layer(x), (ValueError, TypeError, RuntimeError),
                                    [str(bad), str(case.in_features)])
                ctx.measure(f"raised.{method}.{bits}bit", got)


@check("FWD-ERR-ADAPTER-NAME")
def check_err_adapter_name(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():  # one case per family
        with ctx.case(f"{method} {bits}-bit"):
            case = cases.BaseCase(bits)
            layer = ctx.make_layer(_base(ctx, case), method, **cases.adapter_cases(method)[0].params)
            x = ctx.randn(2, case.in_features)
            _expect_error(ctx, f"{method} {bits}-bit, adapter_names=['default', 'no_such_adapter']",
                          lambda x=x, layer=layer: layer(x, adapter_names=["default", "no_such_adapter"]),
                          (ValueError, KeyError),
                          ["no_such_adapter"])


@check("FWD-ERR-RANK")
def check_err_rank(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for r in (0, -2):
            with ctx.case(f"{method} r={r} ({bits}-bit)"):
                base = _base(ctx, cases.BaseCase(bits))
                _expect_error(ctx, f"{method} r={r} ({bits}-bit)",
                              lambda base=base, r=r, method=method: ctx.make_layer(base, method, r=r),
                              (ValueError,), ["`r`", "r must", "r=", "rank"])


@check("FWD-ERR-OFT-LAYOUT")
def check_err_oft_layout(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        case = cases.BaseCase(bits)  # in_features 64
        for params in ({"r": 5, "oft_block_size": 0}, {"r": 0, "oft_block_size": 12}):
            with ctx.case(f"oft {params} ({bits}-bit)"):
                base = _base(ctx, case)
                bad = params["r"] or params["oft_block_size"]
                got = _expect_error(ctx, f"oft {params} on in_features={case.in_features} ({bits}-bit)",
                                    lambda base=base, params=params: ctx.make_layer(base, "oft", **params),
                                    (ValueError,), [str(bad)])
                ctx.measure(f"raised.{bits}bit.{bad}", got)
