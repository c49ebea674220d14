"""transformers ``Trainer`` rules for quantized models (its quantization validation), checked against the real Trainer.

These clauses test the environment (transformers + PEFT + bitsandbytes), not an adapter layer:
they build whole tiny models (``conformance.tinymodels``), attach adapters with the implementation's model entry
(``implementation.model.attach``: ``peft.get_peft_model`` for PEFT, in-place layers for the reference) and hand them
to ``transformers.Trainer``. So they ``require`` the ``model`` capability; an implementation without a model-level
entry (LitGPT) reports them skipped. Which parameters are the adapter's comes from the entry
(``helpers.adapter_params``), not from parameter names.

The rule was first written at ``trainer.py:500-529`` of an older transformers. In transformers 5.x the same
logic lives in ``transformers/trainer_utils.py`` (``validate_quantization_for_training``, 5.23.0:
lines 102-142), called from ``Trainer.__init__``; in 4.x (4.53-4.57) it is inline in
``Trainer.__init__`` (4.57.6: ``trainer.py:539-568``). ``validator_location`` finds either; a
release with neither reports the clauses skipped with that reason.
Every check records the location it found at run time (``validator`` / ``called_from``) and the
transformers version, so a report from another version says what it tested.

The rule as written there (and what the clauses expect):

1. a quantized model that is not a ``PeftModel``, not marked as carrying adapters (``_hf_peft_config_loaded``, what
   transformers' own ``add_adapter`` sets) and whose quantizer is not QAT-trainable is rejected ("purely
   quantized");
2. a quantized model whose quantizer's ``is_trainable`` is False is rejected;
3. a quantized model combined with ``torch.compile()`` is rejected (transformers' error text: "Quantized models
   CANNOT be combined with torch.compile() ... The combination is explicitly blocked"). The code
   only looks for ``_orig_mod`` on the object handed to the Trainer, so compiling in another way
   may slip through; the compile clause tries every way and fails on the ones that do.

Training itself (TRAINER-PEFT-TRAINS, TRAINER-EVAL-THEN-TRAIN) is checked on what a user sees:
finite falling loss, non-zero gradient norms, only adapter parameters changed, bitsandbytes
layers bit-identical (``conformance.quant.snapshot``), also when the Trainer evaluates in between.
DoRA is ``LoraConfig(use_dora=True)`` (PEFT, peft/tuners/lora/dora.py ``DoraLinearLayer``): its magnitude
vectors (``lora_magnitude_vector``) are adapter parameters of their own, trainable in PEFT as in the paper
(arXiv:2402.09353, Sec. 4.1), so each must be trainable and change in the first optimizer step (the weight
norm PEFT detaches does not stop the magnitude's own gradient). An exception out of the environment while it
builds, evaluates or trains (``raised``) is its failure, named with the frame it came from.
All clauses run on the CPU (``use_cpu=True``, ``device_map="cpu"``).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance import quant, tinymodels
from conformance.clauses.clause import check
from conformance.clauses.trainer.helpers import (
    MAGNITUDE_KEY,
    QAT_CONFIG_VARIANTS,
    _flags,
    _hf_model,
    _label,
    _names_method,
    _param_bytes,
    _param_bytes_of,
    _probe_loss,
    _record_source,
    _short,
    adapter_params,
    adapter_spec,
    raised,
    registry_quantizers,
)
from conformance.core import upstream
from conformance.quant.dispatch import describe as describe_cpu

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

TRAIN_STEPS = 4
LEARNING_RATE = 1e-2


# -- helpers (module level so suites can reuse and patch them) -------------------------------------


def make_adapted(entry: Any, model: nn.Module, method: str, arch: str) -> nn.Module:
    """``model`` with the trainer clauses' ``method`` adapter on the attention projections, attached by ``entry``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.random.default_generator.manual_seed(0)  # CPU only (tinymodels.cpu_rng)
        return entry.attach(model, list(tinymodels.ATTENTION_TARGETS[arch]), adapter_spec(method))


def adapted_or_why(entry: Any, model: nn.Module, method: str, arch: str) -> tuple[nn.Module | None, str]:
    """(adapted model, "") or (None, why the attach raised): PEFT 0.20.0 cannot wrap a bnb layer with OFT
    (``Linear4bit.__init__() missing ... 'config'``), which must not hide the other method's results."""
    try:
        return make_adapted(entry, model, method, arch), ""
    except Exception as exc:  # noqa: BLE001 - whatever the implementation raises is the finding
        return None, f"attach({method}) raised {type(exc).__name__}: {_short(str(exc))}"


def trainer_class(impl: Any) -> type | None:
    """The ``Trainer`` subclass the implementation's users train with (``ModelEntry.trainer_class()``, e.g. AdapterHub
    ``adapters``' ``AdapterTrainer``); None: ``transformers.Trainer`` itself."""
    entry = getattr(impl, "model", None)
    get = getattr(entry, "trainer_class", None)
    return get() if callable(get) else None


def make_trainer(model: nn.Module, dataset: list[dict[str, torch.Tensor]] | None = None,
                 max_steps: int = TRAIN_STEPS, learning_rate: float | None = None, eval_steps: int = 0,
                 cls: type | None = None) -> Any:
    """A real ``transformers.Trainer`` (or the implementation's subclass ``cls``) on the CPU: no saving, no reporting,
    no progress output.

    With ``eval_steps`` it also evaluates on the training data every ``eval_steps`` steps; set in
    ``TrainingArguments`` (4.x releases ignore ``eval_strategy`` assigned after construction).
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    learning_rate = LEARNING_RATE if learning_rate is None else learning_rate

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="trainer-", dir=tinymodels.tmp_dir()), max_steps=max_steps,
        per_device_train_batch_size=len(dataset) if dataset else 4, learning_rate=learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **({"eval_strategy": "steps", "eval_steps": eval_steps} if eval_steps else {}),
    )
    train = dataset or tinymodels.as_dataset(tinymodels.fixed_batch())
    with tinymodels.quiet_transformers():  # the validator logs warnings (FPQuant, MXFP4 is_trainable)
        trainer = (cls or Trainer)(model=model, args=args, train_dataset=train,
                                   eval_dataset=train if eval_steps else None)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def trainer_verdict(model: nn.Module, cls: type | None = None) -> tuple[bool, str]:
    """(accepted, message): whether ``Trainer(model=...)`` (or ``cls``) accepts the model; only ValueError is a
    rejection."""
    try:
        with tinymodels.cpu_rng():
            make_trainer(model, cls=cls)
    except ValueError as exc:
        return False, str(exc)
    return True, ""


def _each_case(ctx: CheckContext, run: Callable[[str, int], None], known: Any = None) -> None:
    """Run every (method, bits) case, then fail once listing every failing case (not just the first). ``known``: a
    listed upstream failure (``ctx.known_upstream``) the 4-bit cases may meet: those run as cases of their own, an
    ``xfailed`` while the entry's error shows."""
    failures, passed = [], []
    for method, bits in ctx.cases():
        try:
            with contextlib.ExitStack() as stack:
                if known is not None and bits == 4:
                    stack.enter_context(ctx.case(f"{method}-{bits}bit", known=known))
                with tinymodels.cpu_rng():  # CPU-only clauses: Trainer's set_seed must not touch CUDA
                    run(method, bits)
        except AssertionError as exc:  # ClauseFailure included
            failures.append(str(exc))
        else:
            passed.append(f"{method}-{bits}bit")
    ctx.measure("cases_passed", passed)
    if failures:
        ctx.fail(" | ".join(failures))


#: transformers' mark of a model carrying adapters injected in place (``integrations/peft.py`` ``add_adapter``)
MARK = "_hf_peft_config_loaded"
MARK_LABEL = f"adapted models carrying {MARK}"


def carries_mark(model: nn.Module) -> bool:
    """Whether the model handed to the Trainer carries transformers' adapter mark: its rules are then skipped
    (xfails/transformers.ini ``adapter-mark-skips-rules``)."""
    return bool(getattr(_hf_model(model), MARK, False))


# -- clauses -------------------------------------------------------------------------------------
@check("TRAINER-REJECT-PURELY-QUANTIZED")
def check_reject_purely_quantized(ctx: CheckContext) -> None:
    _record_source(ctx)
    for bits in ctx.bits():
        for arch in tinymodels.ARCHS:
            label = _label(arch, bits)
            model = tinymodels.load_quantized(arch, bits, seed=ctx.seed)
            ctx.check(getattr(model, "is_quantized", False), f"{label}: the loaded model is not marked is_quantized")
            accepted, msg = trainer_verdict(model, trainer_class(ctx.impl))
            ctx.check(not accepted, f"{label}: Trainer accepted a purely quantized model (no adapters); "
                                    "expected ValueError('... purely quantized models ...')")
            ctx.check("purely quantized" in msg, f"{label}: Trainer rejected the model but the message does not "
                                                 f"name 'purely quantized': {_short(msg)!r}")


#: Which tiny architecture trains each (method, bits) case: every pair of (arch, bits), (arch, method),
#: (method, bits) is covered with one training per (method, bits) instead of two.
#: ``train_and_check`` runs any combination (the full matrix is in suites/test_trainer.py, slow).
ARCH_FOR_CASE: dict[tuple[str, int], str] = {
    ("lora", 4): "llama", ("lora", 8): "opt", ("oft", 4): "opt", ("oft", 8): "llama",
    ("dora", 4): "opt", ("dora", 8): "llama",
}


def _first_step_snapshot(params: dict[str, nn.Parameter]) -> tuple[Any, dict[str, torch.Tensor]]:
    """A Trainer callback that copies ``params`` at the end of the first optimizer step, and the dict it fills."""
    from transformers import TrainerCallback

    got: dict[str, torch.Tensor] = {}

    class AfterFirstStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                got.update(_param_bytes_of(params))

    return AfterFirstStep(), got


def _in_env(ctx: CheckContext, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; an exception out of the environment under test (transformers, PEFT, bitsandbytes) is its failure,
    named with the frame it came from (the check's own assertions pass through)."""
    try:
        return fn()
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 - what the environment raises is the finding
        ctx.fail(f"{what} raised {raised(exc)}")


#: Which load path builds each (method, bits) case (the model area's builders, ``tinymodels``): quantized at load time
#: from a float checkpoint, or read back from a quantized checkpoint; each path meets every method and bit width.
CHECKPOINT_CASES: frozenset[tuple[str, int]] = frozenset({("lora", 8), ("oft", 4), ("dora", 8)})


def load_for(arch: str, method: str, bits: int, seed: int) -> tuple[nn.Module, str]:
    """(a fresh tiny model, its load path) for the (method, bits) case (``CHECKPOINT_CASES``)."""
    if (method, bits) in CHECKPOINT_CASES:
        return tinymodels.load_from_quantized_checkpoint(arch, bits, seed=seed), "quantized checkpoint"
    return tinymodels.load_quantized(arch, bits, seed=seed), "quantized at load"


def train_and_check(ctx: CheckContext, arch: str, method: str, bits: int, *, eval_steps: int = 0) -> None:
    """Train a quantized ``arch`` model with ``method`` adapters for TRAIN_STEPS steps and check the outcome.

    Finite per-step losses with non-zero gradient norms, a lower loss on the fixed training batch,
    only adapter parameters changed, every bitsandbytes layer bit-identical. With ``eval_steps``
    the Trainer also evaluates on the same batch every ``eval_steps`` steps (``eval_strategy``).
    """
    base, path = load_for(arch, method, bits, ctx.seed)
    label = (_label(arch, bits, method) + f" ({path}" + (f", evaluating every {eval_steps} steps)" if eval_steps
                                                          else ")"))
    batch = tinymodels.fixed_batch(seed=ctx.seed)
    dataset = tinymodels.as_dataset(batch)
    entry = ctx.impl.model
    model, why = adapted_or_why(entry, base, method, arch)
    if model is None:  # the user cannot train this combination with the installed library: a failure, not a crash
        ctx.fail(f"{label}: {why}")
    layers = tinymodels.bnb_layers(model)
    ctx.check(bool(layers), f"{label}: no bitsandbytes layers in the adapted model")
    snaps = {name: quant.snapshot(layer) for name, layer in layers.items()}
    before = _param_bytes(model)
    owned = set(adapter_params(entry, model))
    ctx.check(bool(owned), f"{label}: the entry's adapter layers hold no parameter of the model")
    magnitudes = adapter_params(entry, model, MAGNITUDE_KEY) if method == "dora" else {}
    if method == "dora":  # DoRA's magnitude is an adapter parameter of its own: trainable, and it must learn
        ctx.check(bool(magnitudes), f"{label}: no DoRA magnitude vectors ({MAGNITUDE_KEY}) among the adapter tensors")
        frozen = [n for n, p in magnitudes.items() if not p.requires_grad]
        ctx.check(not frozen, f"{label}: DoRA magnitude vectors not trainable (requires_grad False): {frozen[:4]}"
                              f"{' ...' if len(frozen) > 4 else ''}")
    loss_before = _in_env(ctx, f"{label}: the forward before training", lambda: _probe_loss(model, batch))
    try:
        trainer = make_trainer(model, dataset, max_steps=TRAIN_STEPS, eval_steps=eval_steps,
                               cls=trainer_class(ctx.impl))
    except ValueError as exc:
        ctx.fail(f"{label}: Trainer rejected a quantized model with {method} adapters: {_short(str(exc))!r}")
    after_first: dict[str, torch.Tensor] = {}
    if magnitudes:
        callback, after_first = _first_step_snapshot(magnitudes)
        trainer.add_callback(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _in_env(ctx, f"{label}: Trainer.train()", trainer.train)
    # diagnostic only: bitsandbytes' CPU inference repacking (see TRAINER-EVAL-THEN-TRAIN)
    repacked = sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
                   for m in tinymodels.bnb_layers(model).values())
    ctx.measure_max(f"repacked_4bit_layers.{method}.{bits}bit", float(repacked))
    steps = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    if eval_steps:
        # "eval_runtime", not "eval_loss": 4.x Trainers find no label names on a PeftModel and log no eval loss
        evals = [h["step"] for h in trainer.state.log_history if "eval_runtime" in h]
        ctx.check(bool(evals), f"{label}: the Trainer did not evaluate (eval_strategy='steps')")
    losses = [h["loss"] for h in steps]
    ctx.check(len(steps) == TRAIN_STEPS, f"{label}: expected {TRAIN_STEPS} logged steps, got {len(steps)}")
    ctx.check(all(math.isfinite(v) for v in losses), f"{label}: non-finite training loss {losses}")
    layers_after = tinymodels.bnb_layers(model)
    rewritten = {n: snaps[n].differences(quant.snapshot(m)) for n, m in layers_after.items() if n in snaps}
    rewritten = {n: d for n, d in rewritten.items() if d}
    why = (f"; {len(rewritten)} bitsandbytes layers were rewritten in place "
           f"(e.g. {next(iter(rewritten))}: {next(iter(rewritten.values()))})" if rewritten else "")
    # a CPU-dependent path (AVX512-BF16): the messages it causes name the features it depends on
    cpu = (f"; bitsandbytes repacked {repacked} 4-bit layers for CPU inference on this CPU ({describe_cpu()})"
           if repacked else "")
    why += cpu
    dead = [h["step"] for h in steps if not (math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0)]
    ctx.check(not dead, f"{label}: gradient norm zero or non-finite at steps {dead} (grad norms "
                        f"{[round(h['grad_norm'], 4) for h in steps]}): the adapters stopped learning{why}")
    for name in layers_after:
        ctx.check(name in snaps, f"{label}: bitsandbytes layer {name} appeared during training")
    for name, diff in rewritten.items():
        ctx.fail(f"{label}: quantized weights of {name} changed during training: {diff}"
                 f" ({len(rewritten)} layers changed){cpu}")
    loss_after = _in_env(ctx, f"{label}: the forward after training", lambda: _probe_loss(model, batch))
    ctx.check(math.isfinite(loss_after), f"{label}: loss on the fixed batch is {loss_after} after training")
    ctx.check(loss_after < loss_before, f"{label}: loss on the fixed batch did not fall after {TRAIN_STEPS} "
                                        f"steps: {loss_before:.6g} -> {loss_after:.6g}")
    ctx.measure_max(f"loss_after_over_before.{method}.{bits}bit", loss_after / loss_before)
    after = _param_bytes(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    foreign = [n for n in changed if n not in owned]
    ctx.check(not foreign, f"{label}: training changed non-adapter parameters {foreign[:4]}"
                           f"{' ...' if len(foreign) > 4 else ''}; expected only the entry's adapter tensors")
    n_adapters = len(owned)
    ctx.check(bool(changed), f"{label}: training changed no parameter (adapter tensors: {n_adapters})")
    ctx.measure_max(f"changed_adapter_tensors.{method}", float(len(changed)))
    if magnitudes:
        ctx.check(bool(after_first), f"{label}: the Trainer ran no first step to observe the DoRA magnitudes after")
        still = [n for n in magnitudes if torch.equal(before[n], after_first[n])]
        ctx.check(not still, f"{label}: the first training step left {len(still)} of {len(magnitudes)} DoRA "
                             f"magnitude vectors unchanged (e.g. {still[:2]}): the magnitudes do not learn")
        ctx.measure_max("magnitude_vectors.dora", float(len(magnitudes)))


@check("TRAINER-PEFT-TRAINS")
def check_peft_trains(ctx: CheckContext) -> None:
    _record_source(ctx)
    _each_case(ctx, lambda method, bits: train_and_check(ctx, ARCH_FOR_CASE[(method, bits)], method, bits))


@check("TRAINER-EVAL-THEN-TRAIN")
def check_eval_then_train(ctx: CheckContext) -> None:
    """Trainer.evaluate runs ``model.eval()`` + no-grad forwards, then training resumes in train mode."""
    _record_source(ctx)
    # on a CPU with AVX512-BF16 the evaluation repacks every 4-bit layer, and no gradient crosses a repacked layer
    # any more (xfails/bitsandbytes.ini cpu-packed-no-grad)
    _each_case(ctx, lambda method, bits: train_and_check(ctx, "llama", method, bits, eval_steps=2),
               known=ctx.known_upstream(upstream.CPU_PACKED_NO_GRAD))


def _compile_ways(entry: Any) -> dict[str, tuple[bool, Callable[[str, int, str, int], nn.Module]]]:
    """Ways a user compiles a quantized model: name -> (has adapters, builder(arch, bits, method, seed)); adapters
    are attached by ``entry`` (``attach``: get_peft_model for PEFT)."""

    def pure(arch: str, bits: int, method: str, seed: int) -> nn.Module:
        return tinymodels.load_quantized(arch, bits, seed=seed)

    def adapted(arch: str, bits: int, method: str, seed: int) -> nn.Module:
        return make_adapted(entry, pure(arch, bits, method, seed), method, arch)

    def compiled_first_layer(hf_model: nn.Module) -> None:
        layers = hf_model.model.decoder.layers if hasattr(hf_model.model, "decoder") else hf_model.model.layers
        layers[0] = torch.compile(layers[0])

    def in_place(model: nn.Module) -> nn.Module:
        model.compile()
        return model

    def sub(model: nn.Module) -> nn.Module:
        compiled_first_layer(_hf_model(model))
        return model

    ways: dict[str, tuple[bool, Callable[[str, int, str, int], nn.Module]]] = {
        "torch.compile(model)": (False, lambda a, b, m, s: torch.compile(pure(a, b, m, s))),
        "model.compile()": (False, lambda a, b, m, s: in_place(pure(a, b, m, s))),
        "decoder layer 0 = torch.compile(layer)": (False, lambda a, b, m, s: sub(pure(a, b, m, s))),
        "torch.compile(adapted)": (True, lambda a, b, m, s: torch.compile(adapted(a, b, m, s))),
        "adapted.compile()": (True, lambda a, b, m, s: in_place(adapted(a, b, m, s))),
        "adapted decoder layer 0 = torch.compile(layer)": (True, lambda a, b, m, s: sub(adapted(a, b, m, s))),
        "attach(torch.compile(model))": (
            True, lambda a, b, m, s: make_adapted(entry, torch.compile(pure(a, b, m, s)), m, a)),
        "model.compile(); attach(model)": (
            True, lambda a, b, m, s: make_adapted(entry, in_place(pure(a, b, m, s)), m, a)),
    }
    return ways


@check("TRAINER-REJECT-COMPILED")
def check_reject_compiled(ctx: CheckContext) -> None:
    """Only builds the Trainer: no compiled forward runs (torch.compile is lazy).

    A way whose model the installed libraries cannot build is noted (``unbuildable_ways``) and hides
    no other way; a ``Trainer()`` that crashes instead of raising the rule's ValueError counts as not
    accepted, and its crash is recorded among ``rejected_ways`` (accelerate 1.12 raises
    ``KeyError: '_orig_mod'`` on a PEFT model with a compiled sub-layer).
    """
    _record_source(ctx)
    slipped: dict[str, list[str]] = {}
    marked: dict[str, list[str]] = {}  # slipped, on a model carrying transformers' adapter mark
    reasons: dict[str, set[str]] = {}
    unbuilt: dict[str, list[str]] = {}  # ways whose model cannot be built here: nothing reaches the Trainer
    arch = "llama"  # the rule does not depend on the architecture; OPT is covered by the other clauses
    for way, (with_adapters, build) in _compile_ways(ctx.impl.model).items():
        pairs = list(ctx.cases()) if with_adapters else [(None, b) for b in ctx.bits()]
        for method, bits in pairs:
            label = _label(arch, bits, method)
            try:
                model = build(arch, bits, method or "lora", ctx.seed)
            except Exception as exc:  # noqa: BLE001 - a way the installed libraries cannot build hides no other
                unbuilt.setdefault(way, []).append(f"{label}: {type(exc).__name__}: {_short(str(exc))}")
                continue
            try:
                accepted, msg = trainer_verdict(model, trainer_class(ctx.impl))
            except Exception as exc:  # noqa: BLE001 - Trainer() crashed: not accepted, but not the rule's message
                accepted, msg = False, f"Trainer() crashed: {type(exc).__name__}: {_short(str(exc))}"
            if accepted:
                (marked if carries_mark(model) else slipped).setdefault(way, []).append(label)
            else:
                reasons.setdefault(way, set()).add("torch.compile" if "torch.compile" in msg and "crashed" not in msg else
                                                   "purely quantized" if "purely quantized" in msg else _short(msg))
    ctx.measure("rejected_ways", {w: sorted(r) for w, r in reasons.items() if w not in slipped and w not in marked})
    ctx.measure("slipped_ways", sorted(slipped))
    if marked:
        ctx.measure("slipped_ways_with_adapter_mark", sorted(marked))
    if unbuilt:
        ctx.measure("unbuildable_ways", unbuilt)
        ctx.note("not buildable with the installed libraries (no model reached the Trainer): "
                 + "; ".join(f"{way} [{'; '.join(why)}]" for way, why in unbuilt.items()))
    if not reasons and not slipped and not marked:
        ctx.skip("no way of compiling could be built with the installed libraries: " + "; ".join(
            f"{way}: {why[0]}" for way, why in unbuilt.items()))
    if marked:  # transformers skips its rules for such a model (xfails/transformers.ini adapter-mark-skips-rules)
        with ctx.case(MARK_LABEL, known=ctx.known_upstream(upstream.ADAPTER_MARK_SKIPS_RULES)):
            ctx.fail("Trainer accepted compiled quantized models carrying transformers' adapter mark "
                     f"({MARK}): " + "; ".join(f"{way} [{', '.join(labels)}]" for way, labels in marked.items()))
    if slipped:
        ctx.fail("Trainer accepted compiled quantized models: " + "; ".join(
            f"{way} [{', '.join(labels)}]" for way, labels in slipped.items()))


@check("TRAINER-REJECT-NOT-TRAINABLE")
def check_reject_not_trainable(ctx: CheckContext) -> None:
    """Swaps ``hf_quantizer`` of the bnb-loaded tiny model for a real registered quantizer instance.

    The instance is built with its own config class (offline, no kernels): the Trainer reads only
    ``hf_quantizer.is_trainable`` / ``is_qat_trainable`` / ``quantization_config.quant_method``.
    ``model.quantization_method`` stays bitsandbytes so the Trainer does not try ``model.to``.
    """
    _record_source(ctx)
    quantizers, unbuilt = registry_quantizers()
    untrainable = [q for q in quantizers if not _flags(q)[0]]
    if not untrainable:
        ctx.skip(f"no registered quantizer with is_trainable False could be built offline ({unbuilt})")
    ctx.measure("quantizers_checked", [q._conformance_tag for q in untrainable])
    ctx.measure("quantizers_not_built", unbuilt)
    arch = "llama"
    for method, bits in ctx.cases():
        for with_adapters in (False, True):
            model = tinymodels.load_quantized(arch, bits, seed=ctx.seed)
            label = _label(arch, bits, method if with_adapters else None)
            if with_adapters:
                model, why = adapted_or_why(ctx.impl.model, model, method, arch)
                if model is None:  # nothing to hand the Trainer; the purely quantized variant was checked
                    ctx.note(f"{label}: not checked with adapters: {why}")
                    ctx.measure(f"not_built.{method}", why)
                    continue
            known = ctx.known_upstream(upstream.ADAPTER_MARK_SKIPS_RULES) if carries_mark(model) else None
            with ctx.case(label, known=known):
                for q in untrainable:
                    _hf_model(model).hf_quantizer = q
                    accepted, msg = trainer_verdict(model, trainer_class(ctx.impl))
                    qat = _flags(q)[1]
                    ctx.check(not accepted, f"{label}: Trainer accepted a model quantized with {q._conformance_tag} "
                                            f"(is_trainable False{', is_qat_trainable True' if qat else ''})")
                    if with_adapters or qat:
                        # past the purely-quantized rule, the not-trainable rule must be the one that fires
                        ctx.check("support training" in msg and _names_method(msg, q),
                                  f"{label}: rejection for {q._conformance_tag} does not say that its method "
                                  f"{q.quantization_config.quant_method!s} does not support training: "
                                  f"{_short(msg)!r}")


@check("TRAINER-ACCEPT-QAT")
def check_accept_qat(ctx: CheckContext) -> None:
    _record_source(ctx)
    quantizers, _ = registry_quantizers(QAT_CONFIG_VARIANTS)
    qat = [q for q in quantizers if _flags(q) == (True, True)]
    if not qat:
        ctx.skip("no registered quantizer is both QAT-trainable and trainable when built offline")
    ctx.measure("quantizers_checked", [q._conformance_tag for q in qat])
    for bits in ctx.bits():
        model = tinymodels.load_quantized("llama", bits, seed=ctx.seed)
        for q in qat:
            model.hf_quantizer = q
            accepted, msg = trainer_verdict(model, trainer_class(ctx.impl))
            ctx.check(accepted, f"{_label('llama', bits)}: Trainer rejected a model whose quantizer "
                                f"{q._conformance_tag} is QAT-trainable and trainable: {_short(msg)!r}")

