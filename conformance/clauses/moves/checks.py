"""MOVE-DTYPE: a whole-module dtype cast keeps the quantized base or refuses cleanly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.moves.cases import CASTS, REFUSAL_WORDS, move_cases
from conformance.core import upstream
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_name

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: snapshot entries a cast may change: the bias is a floating parameter like any other
CASTABLE = ("bias",)


def _payload_changes(before: qlayers.LayerSnapshot, base: torch.nn.Module) -> list[str]:
    return [k for k in qlayers.snapshot(base).differences(before) if k not in CASTABLE]


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
                        ctx.measure("refused", int(ctx.measurements.get("refused", 0)) + 1)
                        ctx.check(any(w.lower() in str(exc).lower() for w in REFUSAL_WORDS),
                                  f"{label}: refused with {type(exc).__name__} that names neither the quantized layer "
                                  f"nor its storage: {exc}")
                        changed = qlayers.snapshot(layer.base_layer).differences(before)
                        now = {k: p.dtype for k, p in layer.adapter_parameters("default").items()}
                        ctx.check(not changed and now == dtypes,
                                  f"{label}: refused, but the layer was changed ({changed or now})")
                        continue
                    base = moved.base_layer
                    changed = _payload_changes(before, base)
                    ctx.check(not changed, f"{label}: the cast changed the quantized base ({', '.join(changed)}; "
                                           f"payload stored as {dtype_name(storage)}, now {dtype_name(base.weight.dtype)})")
                    x = ctx.randn(3, case.in_features, dtype=dtype, offset=j)
                    with torch.no_grad():
                        want = numerics.layer_expected(moved, method, "default", acase.params, x)
                        y = moved(x)
                    ctx.check(tuple(y.shape) == (3, case.out_features) and y.dtype == dtype,
                              f"{label}: output {tuple(y.shape)} {y.dtype} for a {dtype_name(dtype)} input")
                    ctx.bounded(f"ratio.{bits}bit", want.ratio(y),
                                lambda: f"{label}: output after the cast outside the oracle bound {want.describe(y)}")
