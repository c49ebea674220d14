"""The op table: every step the machine can take, as ``name -> Op(needs, applies, draw, apply, accepts, render)``.

One table serves the hypothesis machine (:mod:`.machine` draws an op among those that apply, then its
arguments with ``op.draw``), the replay of a recorded trace and the step-deletion pass
(:mod:`.shrink`, through :func:`run_step`, which refuses a recorded step that ``draw`` could not
have produced in the replayed state) and the rendering of steps as plain calls (:func:`render_step`).

- ``needs``: capabilities the implementation must declare for the op to be drawn at all;
- ``applies(d)``: whether the layer's state allows it now;
- ``draw(data, d)``: its arguments (a JSON-able dict, recorded in the trace);
- ``apply(d, args)``: run it on the layer and the model, with the checks only this step has (the
  invariants every step keeps are ``Driver.check_invariants``, run after it);
- ``accepts(d, args)``: whether recorded ``args`` are ones ``draw`` could give now (replay).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from conformance.clauses.cases import DORA_MAGNITUDE, DORA_MAGNITUDE_SPREAD, POISONS
from conformance.clauses.stateful.declare import ADAPTERS, MERGE
from conformance.core.vocabulary import Capability, capability
from conformance.quant import torchnames
from conformance.quant import validate as qvalidate
from conformance.quant.torchnames import grad_mode_code

from .config import MachineConfig, StepNotApplicable, allowed_variants, seed_for, variant_ok, variants
from .driver import Driver
from .forwards import forward, mixed_forward, train_step
from .invalid import applicable_kinds, poison_safe_merge, poisonable, run_invalid
from .model import AdapterModel
from .moves import _other_device, deepcopy, device_move, dtype_move, state_dict_roundtrip

#: leading shapes of a forward's input (the last dimension is in_features)
INPUT_SHAPES = ((3,), (2, 3), (1,))
INPUT_DTYPES = ("float32", "float16", "bfloat16")
#: bitsandbytes' Linear8bitLt.forward casts its *bias* to the input dtype in place
#: (bitsandbytes/nn/modules.py): a bfloat16 input would round the base bias for good, a bnb
#: behaviour outside the adapter layer under test; 8-bit machines use float32/float16 inputs
INPUT_DTYPES_8BIT = ("float32", "float16")
GRAD_MODES = tuple(torchnames.GRAD_MODES)
#: adapter dtypes a dtype move goes to; OFT stays in float32/float64 (the Cayley solve, see report); DoRA as LoRA
#: (its magnitude moves with A and B: the norm and the factor are then formed in that dtype, which the oracle's
#: ``numerics.dora.norm_expected``/``factor_expected`` bound)
ADAPTER_DTYPES = {"lora": ("float32", "bfloat16", "float16"), "dora": ("float32", "bfloat16", "float16"),
                  "oft": ("float32", "float64")}
MAX_ADAPTERS = 3
LR = 0.05
#: a training step clips the adapters' gradient to this L2 norm before the SGD step, as fine-tuning does
#: (transformers ``TrainingArguments.max_grad_norm``, default 1.0, applied by ``Trainer``). The step's loss,
#: ``(y * g).sum()`` with a fresh random ``g``, is linear in the output and has no minimum, and LoRA's
#: bilinear ``B A`` makes unclipped SGD on it grow geometrically: on 32x24/64x40 layers each step multiplied
#: ``max |A|`` and ``max |B|`` by 2-8 (lr 0.05, scaling 4), so after four or five steps the adapter output
#: exceeds float16's range (an inf output of an fp16 forward) and a merged 8-bit weight its float16 scale
#: (non-finite merged weights): overflows of weights no training produces, outside what the float64 model's
#: rounding bounds describe. Clipped, each step moves the adapters by at most ``LR * MAX_GRAD_NORM`` in L2 norm.
MAX_GRAD_NORM = 1.0
SEEDS = st.integers(0, 2**16)

Args = dict[str, Any]


@dataclass(frozen=True)
class Op:
    name: str
    weight: int
    apply: Callable[[Driver, Args], None]
    draw: Callable[[st.DataObject, Driver], Args]
    render: Callable[[Args], str]
    needs: tuple[Capability, ...] = ()
    applies: Callable[[Driver], bool] = field(default=lambda d: True)
    accepts: Callable[[Driver, Args], bool] = field(default=lambda d, a: True)

    def __post_init__(self) -> None:  # a misspelled capability fails at import
        object.__setattr__(self, "needs", tuple(capability(c) for c in self.needs))


#: without ``input_cast`` the layer is fed what it takes: inputs in the adapters' dtype (the machine builds them in
#: float32), and no dtype move of the adapters (the checks elsewhere leave such cases out: ``CheckContext.make_layer``)
NO_INPUT_CAST = "inputs in the adapters' float32 only and no adapter dtype moves: input_cast is not declared"


def _in_dtypes(d: Driver) -> tuple[str, ...]:
    if not d.has("input_cast"):
        d.stats.notes.add(NO_INPUT_CAST)
        return ("float32",)
    return INPUT_DTYPES_8BIT if d.config.bits == 8 else INPUT_DTYPES


def _unmerged(d: Driver) -> list[str]:
    return [n for n in d.names if n not in d.model.merged]


# -- forwards -----------------------------------------------------------------------------------


# -- merge / unmerge ------------------------------------------------------------------------------

def merge(d: Driver, a: Args) -> None:
    names = a["adapter_names"]
    todo = [n for n in (d.model.active if names is None else names) if n not in d.model.merged]
    before = qvalidate.expected_of(d.layer.base_layer, at_merge=True)
    bias_before = d.bias_dtype()
    d.call("merge", lambda: d.layer.merge(safe_merge=a["safe_merge"], adapter_names=None if names is None
                                          else list(names)))
    _still_valid(d, before, "merge")
    got = list(d.layer.merged_adapters)[len(d.model.merged):]
    if sorted(got) == sorted(todo) and got != todo:
        # the order of application is the implementation's (the reference merges OFT adapters in reverse
        # forward order so the merged layer equals the stacked rotations; PEFT in the order given): the
        # model follows the order the layer reports and checks the weights against it
        d.stats.notes.add(f"{d.method}: merge({todo}) applied in the order {got}")
        todo = got
    d.model.merged += todo
    d.check_flags()
    if todo:
        d.after_requant(todo, +1, "merge", bias_before)
    else:
        d.check_base()


def _still_valid(d: Driver, before: qvalidate.Expected | None, what: str) -> None:
    """After a merge/unmerge the base is a valid quantized layer with what it had before (``quant.validate``)."""
    bad = [] if before is None else qvalidate.problems(d.layer, before)
    if bad:
        d.fail(MERGE, f"after {what} the base is no valid quantized layer: " + "; ".join(bad))


#: DoRA merges one adapter into an unmerged layer only. Merging a DoRA adapter over merged ones is not modelled:
#: its norm is taken on the *unmerged* base weight, which PEFT 0.21.2 recovers by unmerging the merged adapters and
#: merging them again (``LoraLayer._unmerged_base_weight``, peft/tuners/lora/layer.py: two requantizations per merged
#: adapter hidden inside the call) and the reference by undoing them in float32 without requantizing
#: (conformance/reference/dora.py): the calls differ in what they requantize, and the model has one bound per call.
DORA_MERGES_ONE = "dora: the machine merges one DoRA adapter at a time into an unmerged layer (stacked DoRA merges " \
                  "are not modelled: ops.DORA_MERGES_ONE)"


ONE_MERGED = "merges one adapter at a time into an unmerged layer: the implementation does not declare multi_merge"


def _one_at_a_time(d: Driver) -> bool:
    """Whether the machine merges one adapter at a time into an unmerged layer (DoRA, ``DORA_MERGES_ONE``; or an
    implementation without ``multi_merge``, which holds one merged adapter at a time)."""
    return d.method == "dora" or not d.has("multi_merge")


def _merge_applies(d: Driver) -> bool:
    if _one_at_a_time(d):
        return not d.merged and bool(d.names)
    return bool(_unmerged(d))


def _draw_merge(data: st.DataObject, d: Driver) -> Args:
    safe = data.draw(st.booleans(), label="safe_merge") if d.has("safe_merge") else False
    if _one_at_a_time(d):
        d.stats.notes.add(DORA_MERGES_ONE if d.method == "dora" else ONE_MERGED)
        if len(d.model.active) == 1 and data.draw(st.booleans(), label="adapter_names=None"):
            return {"adapter_names": None, "safe_merge": safe}
        return {"adapter_names": [data.draw(st.sampled_from(_unmerged(d)), label="adapter_names")],
                "safe_merge": safe}
    active_left = any(n not in d.model.merged for n in d.model.active)
    if active_left and data.draw(st.booleans(), label="adapter_names=None"):
        return {"adapter_names": None, "safe_merge": safe}
    names = data.draw(st.lists(st.sampled_from(_unmerged(d)), min_size=1, max_size=2, unique=True),
                      label="adapter_names")
    return {"adapter_names": names, "safe_merge": safe}


def _accepts_merge(d: Driver, a: Args) -> bool:
    if a["safe_merge"] and not d.has("safe_merge"):
        return False
    names = a["adapter_names"]
    if _one_at_a_time(d):
        todo = list(d.model.active) if names is None else list(names or [])
        return not d.merged and len(todo) == 1 and todo[0] in d.names
    if names is None:
        return any(n not in d.model.merged for n in d.model.active)
    return bool(names) and all(n in d.names and n not in d.model.merged for n in names)


def unmerge(d: Driver, a: Args) -> None:
    names = list(reversed(d.model.merged))
    before = qvalidate.expected_of(d.layer.base_layer, at_merge=True)
    bias_before = d.bias_dtype()
    d.call("unmerge", d.layer.unmerge)
    _still_valid(d, before, "unmerge")
    d.model.merged = []
    d.check_flags()
    d.after_requant(names, -1, "unmerge", bias_before)
    d.after_unmerge_all()


# -- adapters -------------------------------------------------------------------------------------

def add_adapter(d: Driver, a: Args) -> None:
    name, params = a["name"], dict(a["params"])

    def go() -> None:
        seed_for(d.device, a["seed"])
        d.layer.add_adapter(name, **params)

    d.call(f"add_adapter({name!r})", go)
    if name not in d.layer_names():
        d.fail(ADAPTERS, f"add_adapter({name!r}) did not add it (layer has {d.layer_names()})")
    d.move_magnitude(name, a["seed"])
    d.model.adapters[name] = AdapterModel(d.method, params, d.read(name))
    d.counter += 1


def _draw_add(data: st.DataObject, d: Driver) -> Args:
    variant = data.draw(st.sampled_from(allowed_variants(d.method, d.caps, d.config.bias)), label="variant")
    args = {"name": f"a{d.counter}", "variant": variant, "params": dict(variants(d.method)[variant]),
            "seed": data.draw(SEEDS)}
    if d.method == "dora":  # rendered with the magnitude moved (Driver.move_magnitude); not a draw
        args["method"] = "dora"
    return args


def _accepts_add(d: Driver, a: Args) -> bool:
    return (a["name"] not in d.names and variant_ok(d.method, a["variant"], d.caps, d.config.bias)
            and a["params"] == variants(d.method)[a["variant"]])


def set_adapter(d: Driver, a: Args) -> None:
    names = list(a["adapter_names"])
    d.call("set_adapter", lambda: d.layer.set_adapter(names))
    d.model.active = names


def delete_adapter(d: Driver, a: Args) -> None:
    name = a["name"]
    d.call(f"delete_adapter({name!r})", lambda: d.layer.delete_adapter(name))
    del d.model.adapters[name]
    active = [n for n in d.model.active if n != name]
    if not active and name in d.model.active:
        # the only active adapter was deleted: implementations may leave none active (reference) or
        # activate the first remaining one by name (PEFT BaseTunerLayer.delete_adapter, with a warning)
        got = list(d.layer.active_adapters)
        allowed = ([], sorted(d.model.adapters)[:1])
        if got not in allowed:
            d.fail(ADAPTERS, f"after deleting the only active adapter {name!r} active_adapters={got}; "
                             f"expected one of {list(allowed)}")
        active = got
        d.stats.notes.add(f"delete of the only active adapter leaves active={got or '[]'}")
    d.model.active = active


def set_mode(d: Driver, a: Args) -> None:
    d.call("train()/eval()", lambda: d.layer.train(a["training"]))
    d.model.training = a["training"]


def enable_adapters(d: Driver, a: Args) -> None:
    d.call("enable_adapters", lambda: d.layer.enable_adapters(a["enabled"]))
    d.model.disabled = not a["enabled"]


def _may_disable(d: Driver) -> bool:
    # a forward with adapters disabled unmerges a merged layer: only asked of implementations that unmerge
    return not d.merged or d.has("unmerge")


# -- copies and moves -----------------------------------------------------------------------------


# -- the table ------------------------------------------------------------------------------------

def _magnitude_code(name: str, seed: int) -> str:
    """What ``Driver.move_magnitude`` does to a DoRA adapter, as code."""
    lo, hi = DORA_MAGNITUDE_SPREAD
    return (f"m = layer.adapter_parameters({name!r})[{DORA_MAGNITUDE!r}]; "
            f"m.data *= ({lo} + {hi - lo} * torch.rand(m.shape, generator=torch.Generator().manual_seed({seed}), "
            "dtype=torch.float64)).to(m.dtype)  (DoRA: the magnitude moved off its init, cases.trained_magnitude)")


def _render_add(a: Args) -> str:
    text = _fmt("torch.manual_seed({seed}); layer.add_adapter({name}, **{params})")(a)
    return text + ("; " + _magnitude_code(a["name"], a["seed"]) if a.get("method") == "dora" else "")


def _fmt(template: str) -> Callable[[Args], str]:
    return lambda a: template.format(**{k: repr(v) if k in ("name", "device") else v for k, v in a.items()})


#: in the order hypothesis shrinks towards (the first op is the simplest); weights are relative draw rates
OPS: dict[str, Op] = {op.name: op for op in (
    Op("forward", 4, forward,
       lambda data, d: {"lead": list(data.draw(st.sampled_from(INPUT_SHAPES))),
                        "dtype": data.draw(st.sampled_from(_in_dtypes(d))),
                        "grad_mode": data.draw(st.sampled_from(GRAD_MODES)), "seed": data.draw(SEEDS)},
       lambda a: (f"x = randn({(*a['lead'], 'in')}, seed={a['seed']}).to({a['dtype']}); "
                  f"with {grad_mode_code(a['grad_mode'])}: y = layer(x)")),
    Op("merge", 4, merge, _draw_merge, _fmt("layer.merge(safe_merge={safe_merge}, adapter_names={adapter_names})"),
       applies=_merge_applies, accepts=_accepts_merge),
    Op("unmerge", 3, unmerge, lambda data, d: {}, _fmt("layer.unmerge()"), needs=("unmerge",),
       applies=lambda d: d.merged),
    Op("train_step", 2, train_step,
       lambda data, d: {"lead": list(data.draw(st.sampled_from(INPUT_SHAPES[:2]))), "seed": data.draw(SEEDS),
                        "lr": LR, "max_norm": MAX_GRAD_NORM},
       lambda a: (f"x = randn({(*a['lead'], 'in')}, seed={a['seed']}); (layer(x) * g).sum().backward(); "
                  + ("" if a.get("max_norm") is None else
                     f"clip_grad_norm_(adapter params with grad, max_norm={a['max_norm']}); ")
                  + f"SGD(adapter params with grad, lr={a['lr']}).step()")),
    Op("add_adapter", 2, add_adapter, _draw_add, _render_add,
       needs=("multi_adapter",), applies=lambda d: len(d.names) < MAX_ADAPTERS, accepts=_accepts_add),
    Op("set_adapter", 2, set_adapter,
       lambda data, d: {"adapter_names": data.draw(st.lists(st.sampled_from(d.names), min_size=1,
                                                            max_size=2 if d.has("additive_adapters") else 1,
                                                            unique=True), label="adapter_names")},
       _fmt("layer.set_adapter({adapter_names})"), needs=("multi_adapter",),
       accepts=lambda d, a: bool(a["adapter_names"]) and all(n in d.names for n in a["adapter_names"])),
    Op("invalid", 3, run_invalid,
       lambda data, d: {"kind": data.draw(st.sampled_from(applicable_kinds(d))), "seed": data.draw(SEEDS)},
       _fmt("<invalid step {kind}> (must raise or warn and change nothing)"),
       applies=lambda d: bool(applicable_kinds(d)), accepts=lambda d, a: a["kind"] in applicable_kinds(d)),
    Op("mixed_forward", 2, mixed_forward,
       lambda data, d: {"adapter_names": data.draw(st.lists(st.sampled_from(["__base__", *d.names]), min_size=2,
                                                            max_size=4), label="adapter_names"),
                        "dtype": data.draw(st.sampled_from(_in_dtypes(d))), "seed": data.draw(SEEDS)},
       lambda a: (f"x = randn(({len(a['adapter_names'])}, in), seed={a['seed']}).to({a['dtype']}); "
                  f"y = layer(x, adapter_names={a['adapter_names']})"),
       needs=("mixed_batch",), applies=lambda d: d.mixed_ok() and not d.merged,
       accepts=lambda d, a: all(n in ("__base__", *d.names) for n in a["adapter_names"])),
    Op("enable_adapters", 2, enable_adapters,
       lambda data, d: {"enabled": data.draw(st.booleans()) if _may_disable(d) else True},
       _fmt("layer.enable_adapters({enabled})"), needs=("disable_adapters",),
       accepts=lambda d, a: a["enabled"] or _may_disable(d)),
    Op("set_mode", 1, set_mode, lambda data, d: {"training": data.draw(st.booleans())},
       lambda a: "layer.train()" if a["training"] else "layer.eval()"),
    Op("delete_adapter", 1, delete_adapter,
       lambda data, d: {"name": data.draw(st.sampled_from(_unmerged(d)))}, _fmt("layer.delete_adapter({name})"),
       needs=("delete_adapter",), applies=lambda d: len(d.names) > 1 and bool(_unmerged(d)),
       accepts=lambda d, a: a["name"] in _unmerged(d)),
    Op("state_dict_roundtrip", 1, state_dict_roundtrip, lambda data, d: {"seed": data.draw(SEEDS)},
       _fmt("fresh = impl.create(fresh base, same adapters, seed {seed}); "
            "fresh.load_state_dict(adapter entries of layer.state_dict()); layer = fresh"),
       applies=lambda d: not d.merged),
    Op("deepcopy", 1, deepcopy, lambda data, d: {}, _fmt("layer = copy.deepcopy(layer)")),
    Op("dtype_move", 1, dtype_move, lambda data, d: {"dtype": data.draw(st.sampled_from(ADAPTER_DTYPES[d.method]))},
       _fmt("for every adapter parameter p: p.data = p.data.to(torch.{dtype})"), needs=("input_cast",),
       applies=lambda d: not d.merged,
       accepts=lambda d, a: a["dtype"] in ADAPTER_DTYPES[d.method]),
    # CPU<->CUDA moves only in a machine run for CUDA: a CPU run on a GPU host stays on the CPU
    Op("device_move", 1, device_move, lambda data, d: {"device": _other_device(d)}, _fmt("layer = layer.to({device})"),
       needs=("cuda",), applies=lambda d: d.moves, accepts=lambda d, a: a["device"] == _other_device(d)),
    Op("poison_safe_merge", 1, poison_safe_merge, lambda data, d: {"seed": data.draw(SEEDS)},
       lambda a: (f"poison one entry of an unmerged adapter with {list(POISONS)[a['seed'] % len(POISONS)]} "
                  f"(seed {a['seed']}); layer.merge(safe_merge=True, adapter_names=[it]); restore the entry "
                  "(must raise and change nothing)"),
       needs=("safe_merge",), applies=lambda d: bool(poisonable(d))),
)}


def declared(op: Op, caps: Sequence[str] | frozenset[str]) -> bool:
    """Whether ``op`` can be drawn at all for an implementation declaring ``caps``."""
    return all(c in caps for c in op.needs)


def drawable(d: Driver) -> list[str]:
    """The ops the machine may draw now, each repeated by its weight (sampled_from shrinks to the first)."""
    return [op.name for op in OPS.values() if declared(op, d.caps) and op.applies(d) for _ in range(op.weight)]


def run_step(d: Driver, step: dict[str, Any]) -> None:
    """Record and run one step; ``StepNotApplicable`` if the machine could not have drawn it now.

    The invariants every step keeps are not checked here: the machine's ``@invariant`` and
    :func:`.shrink.replay` call ``Driver.check_invariants`` after it."""
    op = OPS.get(step["op"])
    if op is None:
        raise ValueError(f"unknown step {step['op']!r}; known: {', '.join(OPS)}")
    args = {k: v for k, v in step.items() if k != "op"}
    if not (declared(op, d.caps) and op.applies(d) and op.accepts(d, args)):
        raise StepNotApplicable(f"step {render_step(step)} does not apply after the steps before it")
    d.record({"op": op.name, **args})
    op.apply(d, args)


def render_step(step: dict[str, Any]) -> str:
    """A step as the plain calls it makes on the layer (for messages and reproducers)."""
    a = {k: v for k, v in step.items() if k != "op"}
    if step["op"] == "create":
        cfg = MachineConfig.from_dict(a)
        params = variants(cfg.method)[cfg.variant]
        kw = {**cfg.base.layer_kwargs(), "seed": cfg.seed}
        text = (f"base = make_base_layer({cfg.in_features}, {cfg.out_features}, **{kw}); "
                f"torch.manual_seed({cfg.seed}); layer = impl.create(base, AdapterSpec({cfg.method!r}, 'a0', {params}))")
        return text + ("; " + _magnitude_code("a0", cfg.seed) if cfg.method == "dora" else "")
    op = OPS.get(step["op"])
    return op.render(a) if op is not None else f"{step['op']}({a})"
