"""Model clauses: the model-level entry (``implementation.model``) on tiny quantized causal LMs.

Each case is one (method, bits) family on one load path (``cases.LOAD_PATHS``), from a freshly loaded model. The
adapter is perturbed away from its init before a merge or a save (``twin.cases.perturb``: most methods start at the
identity, where a merge or a save that drops the adapter passes).
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

import torch

from conformance import tinymodels
from conformance.clauses.clause import check
from conformance.clauses.interface import AdapterSpec
from conformance.clauses.model import cases as mcases
from conformance.clauses.model import training  # noqa: F401  (binds the training-path checks)
from conformance.clauses.model.steps import ADAPTER_KEYS, NAME
from conformance.clauses.model.steps import adapted_model as _adapted
from conformance.clauses.model.steps import changed as _changed
from conformance.clauses.model.steps import snapshots as _snapshots
from conformance.clauses.model.steps import spec as _spec
from conformance.clauses.model.steps import step as _step
from conformance.clauses.model.steps import walk as _walk
from conformance.clauses.twin import cases as tcases
from conformance.core import upstream
from conformance.numerics import max_ratio
from conformance.numerics.merge import merge_target
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


@check("MODEL-ATTACH")
def check_attach(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        with ctx.case(label):
            entry = ctx.impl.model
            model = _step(ctx, label, "loading the model", lambda: mcases.load(path, bits, ctx.seed, ctx.device))
            ids = mcases.input_ids(ctx.device, ctx.seed)
            y0 = mcases.logits(model, ids)
            want = mcases.targeted(model)
            records = {n: qvalidate.expected_of(model.get_submodule(n)) for n in want}
            adapted = _step(ctx, label, "attach", lambda: entry.attach(model, mcases.TARGETS, _spec(method)))
            layers = _step(ctx, label, "adapter_layers", lambda: entry.adapter_layers(adapted))
            ctx.check(sorted(layers) == want, f"{label}: adapted modules {sorted(layers)}, the targets name {want}")
            for n, layer in sorted(layers.items()):
                bad = qvalidate.problems(layer, records[n])
                ctx.check(not bad, f"{label}: {n}: the base is no longer the layer it was: {'; '.join(bad)}")
            y1 = _step(ctx, label, "the forward at init", lambda: mcases.logits(adapted, ids))
            diff = float((y1.double() - y0.double()).abs().max())
            ctx.measure_max(f"init_logit_max_diff.{method}", diff)
            if method == "lora":
                ctx.check(torch.equal(y1, y0), f"{label}: the logits at init differ from the base model's (max "
                                               f"|diff| {diff:.3g}); LoRA's path adds exact zeros at init (B = 0)")


def _merge_targets(layers: dict[str, torch.nn.Module], method: str) -> dict[str, tuple[Any, ...]]:
    """Per adapted module: its validity record and what its merge should store (``merge_target``), read before the
    merge."""
    out = {}
    for n, layer in layers.items():
        base = layer.base_layer
        w0 = qlayers.dequantize(base).double().cpu()
        b = getattr(base, "bias", None)
        b0 = None if b is None else b.detach().double().cpu()
        out[n] = (qvalidate.expected_of(base, at_merge=True),
                  *merge_target(layer, method, NAME, mcases.params(method), w0, b0))
    return out


def _leftovers(model: torch.nn.Module, entry: Any) -> list[str]:
    left = sorted(entry.adapter_layers(model))
    left += [k for k in model.state_dict() if any(a in k for a in ADAPTER_KEYS)]
    return left


@check("MODEL-MERGE-UNLOAD")
def check_merge_unload(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        with ctx.case(label):
            entry, adapted, layers, ids, y_adapted = _adapted(ctx, method, bits, path, label)
            targets = _merge_targets(layers, method)
            merged = _step(ctx, label, "merge_and_unload", lambda: entry.merge_and_unload(adapted))
            left = _leftovers(merged, entry)
            ctx.check(not left, f"{label}: adapter modules or tensors left after merge_and_unload: {left[:4]}")
            for n, (record, w, w_err, _b, _b_err) in sorted(targets.items()):
                module = merged.get_submodule(n)
                bad = qvalidate.base_problems(module, record)
                ctx.check(not bad, f"{label}: {n} after merge_and_unload: {'; '.join(bad)}")
                err = (qlayers.dequantize(module).double().cpu() - w).abs()
                bound = qbounds.weight_bound(module).double() + w_err
                ctx.bounded(f"merge_ratio.{method}", max_ratio(err, bound), lambda n=n, err=err: (
                    f"{label}: {n} does not hold the requantization of its merged weight: max |diff| "
                    f"{float(err.max()):.3g}"))
            y_merged = _step(ctx, label, "the merged forward", lambda: mcases.logits(merged, ids))
            ctx.measure_max(f"merged_vs_adapted_logit_max_diff.{method}",
                            float((y_merged.double() - y_adapted.double()).abs().max()))


@check("MODEL-SAVE-ADAPTER")
def check_save_adapter(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        with ctx.case(label):
            entry, adapted, _, ids, y_adapted = _adapted(ctx, method, bits, path, label)
            with tempfile.TemporaryDirectory(prefix="conformance-adapter-") as tmp:
                _step(ctx, label, "save_adapter", lambda tmp=tmp: entry.save_adapter(adapted, tmp))
                fresh = _step(ctx, label, "loading a fresh base",
                              lambda: mcases.load(path, bits, ctx.seed, ctx.device))
                again = _step(ctx, label, "load_adapter", lambda tmp=tmp: entry.load_adapter(fresh, tmp))
            again.eval()
            y_again = _step(ctx, label, "the forward after reload", lambda: mcases.logits(again, ids))
            diff = float((y_again.double() - y_adapted.double()).abs().max())
            ctx.check(torch.equal(y_again, y_adapted), f"{label}: the reloaded adapter's logits differ from the "
                                                       f"adapted model's (max |diff| {diff:.3g})")


def _payload(model: torch.nn.Module) -> dict[str, tuple[qlayers.LayerSnapshot | None, torch.Tensor, Any]]:
    """Per bitsandbytes layer: its bytes (payload, quant state, bias; None for a layer in bitsandbytes' CPU packed
    layout, repacked by an eval forward on a CPU with AVX512-BF16: a save writes the standard layout), the weight it
    decodes to, and its validity record."""
    out = {}
    for n, m in sorted(tinymodels.bnb_layers(model).items()):
        packed = qlayers.bits_of(m) == 4 and qlayers.is_cpu_packed(m)
        out[n] = (None if packed else qlayers.snapshot(m), qlayers.dequantize(m).cpu(), qvalidate.expected_of(m))
    return out


def _payload_differences(before: tuple[Any, ...], after: tuple[Any, ...]) -> list[str]:
    """What differs between two ``_payload`` entries: the bytes where both have them, the decoded weight, the
    settings."""
    out = before[0].differences(after[0]) if before[0] is not None and after[0] is not None else []
    if not torch.equal(before[1], after[1]):
        out.append("decoded weight")
    out += [f"{k} {v} -> {after[2].settings.get(k)}" for k, v in before[2].settings.items()
            if after[2].settings.get(k) != v]
    return out


@check("MODEL-SAVE-MERGED")
def check_save_merged(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        # transformers cannot re-save a model read back from a quantized checkpoint, nor round-trip a 4-bit model
        # bitsandbytes repacked for the CPU (xfails/transformers.ini)
        if path == "quantized-checkpoint":
            known = ctx.known_upstream(upstream.QUANTIZED_CHECKPOINT_RESAVE)
        else:
            known = ctx.known_upstream(upstream.CPU_PACKED_SAVE) if bits == 4 and ctx.device == "cpu" else None
        with ctx.case(label, known=known):
            entry, adapted, _, ids, _ = _adapted(ctx, method, bits, path, label)
            tokens_adapted = _step(ctx, label, "generate (adapted)", lambda: mcases.greedy(adapted, ids))
            merged = _step(ctx, label, "merge_and_unload", lambda: entry.merge_and_unload(adapted))
            merged.eval()
            y_merged = _step(ctx, label, "the merged forward", lambda: mcases.logits(merged, ids))
            tokens = _step(ctx, label, "generate (merged)", lambda: mcases.greedy(merged, ids))
            payload = _payload(merged)
            with tempfile.TemporaryDirectory(prefix="conformance-merged-") as tmp:
                _step(ctx, label, "save_pretrained (merged)", lambda tmp=tmp: merged.save_pretrained(tmp))
                back = _step(ctx, label, "from_pretrained (merged)",
                             lambda tmp=tmp: tinymodels.load_saved(mcases.ARCH, tmp, device=ctx.device))
            back.eval()
            now = _payload(back)
            ctx.check(sorted(now) == sorted(payload), f"{label}: the reloaded model's bitsandbytes layers "
                                                      f"{sorted(now)[:3]}... differ from the merged model's")
            changed = {n: _payload_differences(payload[n], now[n]) for n in payload if n in now}
            changed = {n: d for n, d in changed.items() if d}
            ctx.check(not changed, f"{label}: save/reload changed the payload of {len(changed)} layer(s), e.g. "
                                   f"{next(iter(changed.items()), None)}")
            y_back = _step(ctx, label, "the reloaded forward", lambda: mcases.logits(back, ids))
            diff = float((y_back.double() - y_merged.double()).abs().max())
            ctx.check(torch.equal(y_back, y_merged), f"{label}: the reloaded merged model's logits differ from the "
                                                     f"merged model's (max |diff| {diff:.3g})")
            tokens_back = _step(ctx, label, "generate (reloaded)", lambda: mcases.greedy(back, ids))
            ctx.check(torch.equal(tokens_back, tokens), f"{label}: greedy tokens after reload {tokens_back.tolist()} "
                                                        f"differ from the merged model's {tokens.tolist()}")
            agree = float((tokens == tokens_adapted).double().mean())
            ctx.measure(f"merged_vs_adapted_token_agreement.{method}.{bits}bit.{path}", agree)


# -- the model-level bookkeeping: a second adapter, the active one, disabled adapters, a deleted adapter -------------
SECOND = "second"


def _with_second(ctx: CheckContext, method: str, bits: int, path: str, label: str
                 ) -> tuple[Any, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(entry, adapted model, input ids, logits with the first adapter alone): the first adapter attached and
    perturbed, then a second one added on the same targets, made active and perturbed (other values)."""
    entry, adapted, _, ids, y_first = _adapted(ctx, method, bits, path, label)
    spec = AdapterSpec(method, SECOND, mcases.params(method))
    _step(ctx, label, "add_adapter", lambda: entry.add_adapter(adapted, mcases.TARGETS, spec))
    _step(ctx, label, f"set_adapter({SECOND!r})", lambda: entry.set_adapter(adapted, SECOND))
    gen = ctx.generator(offset=12)
    for _, layer in sorted(_step(ctx, label, "adapter_layers", lambda: entry.adapter_layers(adapted)).items()):
        tcases.perturb(layer, gen, SECOND)
    return entry, adapted, ids, y_first


def _alone(ctx: CheckContext, adapted: torch.nn.Module, method: str, bits: int, path: str, label: str,
           ids: torch.Tensor) -> torch.Tensor:
    """Logits of a freshly loaded base with only the adapter ``SECOND``, its tensors copied from ``adapted``."""
    entry = ctx.impl.model
    layers = entry.adapter_layers(adapted)
    fresh = _step(ctx, label, "loading a fresh base", lambda: mcases.load(path, bits, ctx.seed, ctx.device))
    alone = _step(ctx, label, "attach (the second adapter alone)",
                  lambda: entry.attach(fresh, mcases.TARGETS, AdapterSpec(method, SECOND, mcases.params(method))))
    with torch.no_grad():
        for n, layer in entry.adapter_layers(alone).items():
            for k, t in layer.adapter_parameters(SECOND).items():
                t.copy_(layers[n].adapter_parameters(SECOND)[k])
    return _step(ctx, label, "the forward (the second adapter alone)", lambda: mcases.logits(alone, ids))


def _same(ctx: CheckContext, label: str, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = float((got.double() - want.double()).abs().max())
    ctx.check(torch.equal(got, want), f"{label}: {what} (max |diff| {diff:.3g})")


@check("MODEL-SET-ADAPTER")
def check_set_adapter(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        with ctx.case(label):
            entry, adapted, ids, y_first = _with_second(ctx, method, bits, path, label)
            y_second = _step(ctx, label, f"the forward ({SECOND!r} active)", lambda: mcases.logits(adapted, ids))
            _same(ctx, label, y_second, _alone(ctx, adapted, method, bits, path, label, ids),
                  f"with {SECOND!r} active the logits differ from a base with {SECOND!r} alone")
            _step(ctx, label, f"set_adapter({NAME!r})", lambda: entry.set_adapter(adapted, NAME))
            y_back = _step(ctx, label, f"the forward ({NAME!r} active)", lambda: mcases.logits(adapted, ids))
            _same(ctx, label, y_back, y_first, f"with {NAME!r} active again the logits differ from those before "
                                               f"{SECOND!r} was added")


@check("MODEL-DISABLE")
def check_disable(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        with ctx.case(label):
            base = _step(ctx, label, "loading the model", lambda: mcases.load(path, bits, ctx.seed, ctx.device))
            ids = mcases.input_ids(ctx.device, ctx.seed)
            y_base = _step(ctx, label, "the base forward", lambda: mcases.logits(base, ids))
            entry, adapted, _, _, y_adapted = _adapted(ctx, method, bits, path, label)
            context = _step(ctx, label, "disabled()", lambda: entry.disabled(adapted))
            with context:
                y_off = _step(ctx, label, "the forward with adapters disabled", lambda: mcases.logits(adapted, ids))
            y_on = _step(ctx, label, "the forward after enabling", lambda: mcases.logits(adapted, ids))
            _same(ctx, label, y_off, y_base, "with adapters disabled the logits differ from the base model's")
            _same(ctx, label, y_on, y_adapted, "after the disabled context the logits differ from the adapted model's")


def _mentions(adapted: torch.nn.Module, name: str) -> list[str]:
    """Parameter, buffer and module paths with a component ``name`` (not ``state_dict()``: on a CPU with AVX512-BF16
    it un-packs every repacked 4-bit layer in place, and the next forward packs it again with other weights;
    xfails/bitsandbytes/cpu_packed_state_dict.py)."""
    keys = [n for n, _ in adapted.named_parameters()] + [n for n, _ in adapted.named_buffers()]
    keys += [n for n, _ in adapted.named_modules()]
    return sorted({k for k in keys if name in k.split(".")})


@check("MODEL-DELETE-ADAPTER")
def check_delete_adapter(ctx: CheckContext) -> None:
    for method, bits, path, label in _walk(ctx):
        with ctx.case(label):
            entry, adapted, ids, y_first = _with_second(ctx, method, bits, path, label)
            ctx.check(bool(_mentions(adapted, SECOND)), f"{label}: no parameter, buffer or module path names the added "
                                                        f"adapter {SECOND!r}")
            _step(ctx, label, f"set_adapter({NAME!r})", lambda: entry.set_adapter(adapted, NAME))
            _step(ctx, label, f"delete_adapter({SECOND!r})", lambda: entry.delete_adapter(adapted, SECOND))
            left = _mentions(adapted, SECOND)
            ctx.check(not left, f"{label}: after delete_adapter({SECOND!r}) {len(left)} key(s) or module(s) still "
                                f"name it, e.g. {left[:3]}")
            y = _step(ctx, label, "the forward after the delete", lambda: mcases.logits(adapted, ids))
            _same(ctx, label, y, y_first, f"after deleting {SECOND!r} the logits differ from those with {NAME!r} alone")


# -- dtype moves on the model the entry returns -------------------------------------------------------------------
def _bare_refuses(move: Any, bits: int, storage: torch.dtype, ctx: CheckContext) -> bool:
    """Whether transformers refuses ``move`` on the bare quantized model (a throwaway copy)."""
    try:
        move(mcases.load_stored(bits, storage, ctx.seed, ctx.device))
    except (TypeError, ValueError, NotImplementedError):
        return True
    return False


@check("MODEL-DTYPE-MOVE")
def check_dtype_move(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        for storage in (mcases.QUANT_STORAGES if bits == 4 else (torch.int8,)):
            for move_name, (move, dtype) in mcases.DTYPE_MOVES.items():
                label = f"{method}/{bits}bit, quant_storage {str(storage).removeprefix('torch.')}, adapted.{move_name}"
                bare_refuses = _bare_refuses(move, bits, storage, ctx)
                # what transformers lets through on the bare model reaches bitsandbytes' cast of a float payload
                known = (ctx.known_upstream(upstream.FLOAT_STORAGE_CAST)
                         if bits == 4 and storage.is_floating_point and storage != dtype and not bare_refuses else None)
                with ctx.case(label, known=known):
                    entry = ctx.impl.model
                    model = _step(ctx, label, "loading the model",
                                  lambda storage=storage: mcases.load_stored(bits, storage, ctx.seed, ctx.device))
                    adapted = _step(ctx, label, "attach", lambda: entry.attach(model, mcases.TARGETS, _spec(method)))
                    before = _snapshots(adapted)
                    try:
                        moved = move(adapted)
                    except (TypeError, ValueError, NotImplementedError) as exc:
                        changed = _changed(before, adapted)
                        ctx.measure("refused", int(ctx.measurements.get("refused", 0)) + 1)
                        ctx.check(not changed, f"{label}: refused ({type(exc).__name__}), but the cast changed the "
                                               f"quantized base of {len(changed)} layer(s), e.g. "
                                               f"{next(iter(changed.items()), None)}")
                        continue
                    except Exception as exc:  # noqa: BLE001 - neither a refusal nor a move: fails, named
                        ctx.fail(f"{label}: raised {type(exc).__name__}: {exc}")
                    changed = _changed(before, moved)
                    ctx.check(not changed, f"{label}: the cast changed the quantized base of {len(changed)} layer(s) "
                                           f"(e.g. {next(iter(changed.items()), None)})"
                                           + ("; transformers refuses this move on the bare model, the returned "
                                              "model let it through" if bare_refuses else ""))
                    y = _step(ctx, label, "the forward after the move",
                              lambda moved=moved: mcases.logits(moved, mcases.input_ids(ctx.device, ctx.seed)))
                    ctx.check(bool(torch.isfinite(y).all()), f"{label}: non-finite logits after the move")
