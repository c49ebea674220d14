"""Checks of area ``wording``: PEFT's exact texts (SHOULD). The MUST behind each is checked elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.observe import recorded_warnings, warning_texts
from conformance.clauses.wording.declare import LORA_MERGE_TEXT, MERGE_TWICE_TEXT, NAN_TEXT, UNMERGE_NOTHING_TEXT

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


def _layer(ctx: CheckContext, method: str, bits: int, name: str = "default") -> torch.nn.Module:
    case = cases.BaseCase(bits)
    base = ctx.make_base(case)
    layer = ctx.make_layer(base, method, adapter_name=name, **cases.adapter_cases(method)[0].params)
    cases.fill_adapter(layer, name, ctx.generator(21))
    return layer


def _warned(ctx: CheckContext, label: str, want: str, step: object) -> None:
    with recorded_warnings() as caught:
        step()  # type: ignore[operator]
    got = warning_texts(caught)
    ctx.check(want in got, f"{label}: no warning {want!r}; warnings: {got}")


@check("MERGE-WARNS-LORA-TEXT")
def check_lora_merge_text(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():  # DoRA: a LoRA variant in PEFT, merged (and warned) by the same bnb code
        layer = _layer(ctx, method, bits)
        _warned(ctx, f"{method} {bits}-bit merge()", LORA_MERGE_TEXT.format(bits=bits), layer.merge)


@check("MERGE-TWICE-TEXT")
def check_merge_twice_text(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        layer = _layer(ctx, method, bits)
        with recorded_warnings():
            layer.merge()
        _warned(ctx, f"{method} {bits}-bit second merge()", MERGE_TWICE_TEXT, layer.merge)


@check("MERGE-UNMERGE-NOTHING-TEXT")
def check_unmerge_nothing_text(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        layer = _layer(ctx, method, bits)
        _warned(ctx, f"{method} {bits}-bit unmerge() with nothing merged", UNMERGE_NOTHING_TEXT, layer.unmerge)


@check("SAFE-MERGE-NONFINITE-TEXT")
def check_nan_text(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        layer = _layer(ctx, method, bits, name="broken")
        key = "oft_R.weight" if method == "oft" else "lora_A.weight"
        with torch.no_grad():
            layer.adapter_parameters("broken")[key].view(-1)[0] = float("nan")
        label = f"{method} {bits}-bit merge(safe_merge=True) with NaN in {key}"
        want = NAN_TEXT.format(adapter="broken")
        try:
            with recorded_warnings():
                layer.merge(safe_merge=True)
        except ValueError as exc:
            ctx.check(want in str(exc), f"{label}: ValueError {str(exc)!r} lacks {want!r}")
        except Exception as exc:  # noqa: BLE001 - the MUST (SAFE-MERGE-NONFINITE) reports the wrong type
            ctx.fail(f"{label}: raised {type(exc).__name__} ({exc}), not ValueError with {want!r}")
        else:
            ctx.fail(f"{label}: did not raise")
