"""Safe-merge clauses: a non-finite adapter never reaches the quantized base weights.

PEFT's text (``peft/tuners/lora/bnb.py``, the merge): ``safe_merge=True`` checks the merged weights
with ``torch.isfinite`` *before* writing them and raises ``ValueError("NaNs detected in the merged
weights. The adapter {name} seems to be broken")``. The poison is one element set to NaN, +Inf or
-Inf in each adapter tensor (``KEYS``). For OFT a NaN parameter makes the whole rotation block NaN, an Inf
may give NaN through the solve: either way the merged weights are non-finite. DoRA goes through the same
LoRA merge in PEFT (``DoraLinearVariant.merge_safe`` returns the weights the check reads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.observe import recorded_warnings, warning_texts
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

POISONS = cases.POISONS


def nan_message(adapter: str) -> str:
    """PEFT's safe-merge error text, verbatim."""
    return f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"


def _params(method: str) -> dict[str, Any]:
    if method == "lora":
        return cases.adapter_cases("lora")[0].with_params(lora_bias=True).params
    return dict(cases.adapter_cases(method)[0].params)


#: the adapter tensors a poison is put in, per method. DoRA: LoRA's (no lora_bias: DoRA refuses it) and the
#: magnitude; a non-finite ``A`` or ``B`` makes the norm ``||W0 + s B A||_c`` of every row it reaches non-finite, a
#: non-finite magnitude entry its row of the factor ``m / n``: either way the merged weights are non-finite
KEYS = {"lora": ("lora_A.weight", "lora_B.weight", "lora_B.bias"), "oft": ("oft_R.weight",),
        "dora": ("lora_A.weight", "lora_B.weight", cases.DORA_MAGNITUDE)}


def _keys(method: str) -> tuple[str, ...]:
    return KEYS[method]


def _poisoned_cases(ctx: CheckContext) -> Iterator[tuple[str, int, cases.BaseCase, str, str]]:
    for method, bits in ctx.cases():
        bases = ([cases.BaseCase(4), cases.BaseCase(4, quant_type="fp4", double_quant=True,
                                                   compute_dtype=torch.float16)] if bits == 4 else [cases.BaseCase(8)])
        for case in bases:
            for key in _keys(method):
                for poison in POISONS:
                    yield method, bits, case, key, poison


def _layer(ctx: CheckContext, method: str, case: cases.BaseCase, name: str = "broken") -> torch.nn.Module:
    params = _params(method)
    if method == "lora" and not ctx.has("lora_bias"):
        params.pop("lora_bias")
    base = ctx.make_base(case)
    layer = ctx.make_layer(base, method, adapter_name=name, **params)
    cases.fill_adapter(layer, name, ctx.generator(11))
    return layer


def _poison(layer: torch.nn.Module, name: str, key: str, value: float) -> bool:
    tensors = layer.adapter_parameters(name)
    if key not in tensors:
        return False
    with torch.no_grad():
        tensors[key].view(-1)[0] = value
    return True


def _labelled_cases(ctx: CheckContext) -> Iterator[tuple[str, int, cases.BaseCase, str, str, str]]:
    """``_poisoned_cases`` with each case's label; a ``lora_B.bias`` case needs ``lora_bias`` (else skipped)."""
    for method, bits, case, key, poison in _poisoned_cases(ctx):
        if key == "lora_B.bias" and not ctx.require_case("lora_bias", f"{method} on {case.label}, {key}"):
            continue
        yield method, bits, case, key, poison, f"{method} on {case.label}, {key}[0] = {poison}"


def _poisoned_layer(ctx: CheckContext, method: str, case: cases.BaseCase, key: str, poison: str) -> torch.nn.Module:
    """A fresh layer of the case whose adapter ``broken`` holds ``poison`` at ``key[0]`` (the case is skipped when
    the layer has no such tensor)."""
    layer = _layer(ctx, method, case)
    if not _poison(layer, "broken", key, POISONS[poison]):
        ctx.skip_this_case(f"the layer has no adapter tensor {key}")
    return layer


@check("SAFE-MERGE-NONFINITE")
def check_safe_merge(ctx: CheckContext) -> None:
    for method, _bits, case, key, poison, label in _labelled_cases(ctx):
        with ctx.case(label):
            layer = _poisoned_layer(ctx, method, case, key, poison)
            snap = qlayers.snapshot(layer.base_layer)
            try:
                with recorded_warnings():
                    layer.merge(safe_merge=True)
            except ValueError as exc:
                if "broken" not in str(exc):  # PEFT's exact text is SAFE-MERGE-NONFINITE-TEXT (SHOULD)
                    ctx.fail(f"{label}: ValueError raised, but its message {str(exc)!r} does not name the adapter "
                             "'broken'")
            except Exception as exc:
                ctx.fail(f"{label}: merge(safe_merge=True) raised {type(exc).__name__}: {exc}; expected ValueError")
            else:
                ctx.fail(f"{label}: merge(safe_merge=True) did not raise (merged={layer.merged})")
            diff = snap.differences(qlayers.snapshot(layer.base_layer))
            ctx.check(diff == [], f"{label}: the failed safe merge modified the base layer: {diff}")
            ctx.check(not layer.merged and list(layer.merged_adapters) == [],
                      f"{label}: after the refused merge merged={layer.merged}, "
                      f"merged_adapters={list(layer.merged_adapters)}")


@check("SAFE-MERGE-OTHER-ADAPTER")
def check_other_adapter(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        case = cases.BaseCase(bits)
        params = _params(method)
        params.pop("lora_bias", None)  # lora_bias has its own clause (SAFE-MERGE-FINITE-BIAS)
        base = ctx.make_base(case)
        layer = ctx.make_layer(base, method, adapter_name="broken", **params)
        cases.fill_adapter(layer, "broken", ctx.generator(11))
        layer.add_adapter("good", **params)
        cases.fill_adapter(layer, "good", ctx.generator(12))
        _poison(layer, "broken", _keys(method)[0], math.nan)
        label = f"{method} {bits}-bit"
        with torch.no_grad():
            w0, b0 = numerics.base_weights(layer.base_layer)
            try:
                with recorded_warnings():
                    layer.merge(safe_merge=True, adapter_names=["broken"])
            except ValueError:
                pass
            else:
                ctx.fail(f"{label}: merging the NaN adapter with safe_merge=True did not raise")
            with recorded_warnings():
                layer.merge(safe_merge=True, adapter_names=["good"])
            ctx.check(list(layer.merged_adapters) == ["good"],
                      f"{label}: merged_adapters is {list(layer.merged_adapters)} after merging 'good'")
            wt, we, _, _ = numerics.merge_target(layer, method, "good", params, w0, b0)
            w1, _ = numerics.base_weights(layer.base_layer)
            bound = qbounds.weight_bound(layer.base_layer) + we
        r = numerics.observed(w1, wt, bound)
        ctx.bounded(f"ratio.{method}.{bits}bit", r,
                    lambda: f"{label}: weights after merging 'good' are off by ratio {r:.3g} of the bound")


@check("SAFE-MERGE-FINITE-BIAS")
def check_finite_bias(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        case = cases.BaseCase(bits)
        snaps = []
        for safe in (True, False):
            layer = _layer(ctx, "lora", case, name="good")
            try:
                with recorded_warnings():
                    layer.merge(safe_merge=safe)
            except Exception as exc:
                ctx.fail(f"lora {bits}-bit, lora_bias=True, finite adapter: merge(safe_merge={safe}) raised "
                         f"{type(exc).__name__}: {exc}")
            ctx.check(list(layer.merged_adapters) == ["good"],
                      f"lora {bits}-bit: merged_adapters {list(layer.merged_adapters)} after merge(safe_merge={safe})")
            snaps.append(qlayers.snapshot(layer.base_layer))
        diff = snaps[0].differences(snaps[1])
        ctx.check(diff == [], f"lora {bits}-bit, lora_bias=True: safe and unsafe merge disagree on {diff}")


NONFINITE_WORDS = ("nan", "inf", "finite", "broken")


@check("SAFE-UNSAFE-WARNS")
def check_unsafe_warns(ctx: CheckContext) -> None:
    silent = []
    for method, bits, case, key, poison, label in _labelled_cases(ctx):
        with ctx.case(label):
            layer = _poisoned_layer(ctx, method, case, key, poison)
            outcome = "silent"
            try:
                with recorded_warnings() as caught:
                    layer.merge(safe_merge=False)
            except Exception as exc:
                outcome = f"raised {type(exc).__name__}"
            else:
                texts = [t for t in warning_texts(caught) if any(w in t.lower() for w in NONFINITE_WORDS)]
                if texts:
                    outcome = "warned"
            ctx.measure(f"outcome.{method}.{bits}bit.{key}.{poison}", outcome)
            if outcome == "silent":
                silent.append(label)
    if silent:
        ctx.fail(f"{len(silent)} unsafe merges wrote non-finite weights silently, e.g. {silent[:3]}")
