"""What a stateful example starts from, what it can break, and what a run counts.

- :class:`MachineConfig`: the base layer (a ``cases.BaseCase``) and first adapter of one example (JSON-able:
  reproducers embed it); :func:`configs_for` lists the ones a (method, bits) case draws from;
- :class:`Violation`: an invariant of one clause broken by the last step of a trace; its ``key`` is
  (clause, step kind), and each key has a subclass of its own (:func:`violation_type`), so hypothesis
  treats violations of different clauses or step kinds as distinct bugs;
- :class:`Stats`: counters of a run (examples, steps, steps per op, how often each clause's
  invariant was reached and by which op), worst ratios, the shortest violation per key, which key a
  shrink pass lets raise, and the shrink-time budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from conformance.clauses.cases import BaseCase, OnBase
from conformance.clauses.stateful.declare import STATE_IDS
from conformance.core import upstream
from conformance.core.vocabulary import params_needing
from conformance.quant import layers as qlayers

#: (in_features, out_features): out_features not a power of two (a non-square layer)
SHAPES = ((64, 40), (32, 24))
#: (in_features, out_features, blocksize) of the bases with bitsandbytes' CPU packed layout switched on: a shape
#: bitsandbytes 0.50.2 can repack (``quant.layers.cpu_packed_shape_refusal``: out_features a multiple of 32, the
#: blocksize dividing in_features); the shapes above stay in the standard layout (40 and 24 rows assert)
PACKED_SHAPE = (64, 64, 64)
#: the situation of a listed bitsandbytes failure the driver recognises (``xfails/bitsandbytes.ini``): a valid
#: forward with grad on a base in the packed layout raising inside bitsandbytes
PACKED_TRAIN_GRAD = upstream.CPU_PACKED_TRAIN_GRAD
LORA_VARIANTS: tuple[dict[str, Any], ...] = (
    {"r": 4, "lora_alpha": 8.0, "init_lora_weights": False},
    {"r": 2, "lora_alpha": 4.0, "init_lora_weights": False, "use_rslora": True},
    {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False, "lora_bias": True},
)
#: DoRA (``LoraConfig(use_dora=True)`` in PEFT): LoRA's variants without ``lora_bias``, which PEFT 0.21.2 refuses
#: with DoRA (``LoraConfig.__post_init__``) and the reference declares a DoRA limitation
DORA_VARIANTS: tuple[dict[str, Any], ...] = tuple(v for v in LORA_VARIANTS if not v.get("lora_bias"))
OFT_VARIANTS: tuple[dict[str, Any], ...] = (
    {"r": 4, "oft_block_size": 0, "init_weights": False},
    {"r": 0, "oft_block_size": 8, "init_weights": False},
    {"r": 0, "oft_block_size": 8, "init_weights": False, "block_share": True},
)


class StopRun(BaseException):  # noqa: N818  (not an error: ends a run whose shrink budget is spent)
    """Raised through hypothesis to end shrinking when the time budget is spent (see :class:`Stats`)."""


class StepNotApplicable(ValueError):
    """A recorded step the machine would not have drawn in the replayed state (e.g. it names an
    adapter whose ``add_adapter`` a deletion removed): replaying it would test an invalid step as
    if it were valid."""


def step_kind(step: dict[str, Any]) -> str:
    """What kind of step ``step`` is: its op, and for an invalid step which invalid call (``invalid:set_unknown``)."""
    op = str(step.get("op", "?"))
    return f"{op}:{step['kind']}" if op == "invalid" and "kind" in step else op


class Violation(AssertionError):
    """An invariant of clause ``clause`` does not hold after the last step of ``trace``."""

    clause: str = ""

    def __init__(self, message: str, trace: list[dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(f"{self.clause}: {message}")
        self.message = message
        self.trace = list(trace or [])
        self.config = dict(config or {})

    @property
    def kind(self) -> str:
        """The kind of step that broke the invariant (:func:`step_kind` of the trace's last step)."""
        return step_kind(self.trace[-1]) if self.trace else "create"

    @property
    def key(self) -> tuple[str, str]:
        """(clause, step kind): what makes two violations of one (method, bits) case distinct."""
        return self.clause, self.kind


class UpstreamFailure(Violation):
    """A valid step that raised inside bitsandbytes in a situation bitsandbytes is listed as failing in
    (``situation``, a key of ``xfails/bitsandbytes.ini``): the example ends with a fresh layer as after a recorded
    violation, but it is neither recorded as a violation nor shrunk (``Stats.raises``); the step's clause
    (``clause``) reports it from ``Stats.upstream``, as the listed failure when ``CheckContext.known_upstream``
    lists it for the running bitsandbytes, as a violation otherwise."""

    situation: str = ""

    def __init__(self, clause: str, situation: str, message: str, trace: list[dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.clause, self.situation = clause, situation
        super().__init__(message, trace, config)

    @property
    def key(self) -> tuple[str, str]:
        """Distinct from every violation's key (a replay that meets it does not show the violation it shrinks)."""
        return self.clause, f"{self.kind} [bitsandbytes {self.situation}]"


VIOLATIONS: dict[str, type[Violation]] = {
    cid: type("Violation_" + cid.replace("-", "_"), (Violation,), {"clause": cid}) for cid in STATE_IDS
}
_KIND_TYPES: dict[tuple[str, str], type[Violation]] = {}


def violation_type(clause: str, kind: str) -> type[Violation]:
    """The subclass of ``VIOLATIONS[clause]`` raised for a violation by a step of kind ``kind`` (one per key:
    hypothesis tells bugs apart by exception type and place, and every clause raises from one place)."""
    key = (clause, kind)
    if key not in _KIND_TYPES:
        name = "Violation_" + clause.replace("-", "_") + "__" + kind.replace(":", "_")
        _KIND_TYPES[key] = type(name, (VIOLATIONS[clause],), {})
    return _KIND_TYPES[key]


def seed_for(device: str, seed: int) -> None:
    """Seed the generators a step on ``device`` uses: the CPU one only unless the machine runs on CUDA.

    ``torch.manual_seed`` also seeds CUDA when the process initialised it; a CPU run on a GPU
    host must not touch the CUDA context (another test may have broken it).
    """
    if str(device).startswith("cuda"):
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


#: the methods the machine models (each with its adapter variants below); an implementation's others (the methods
#: judged against their dense twin, TWIN-*) are not run by it
MACHINE_METHODS: frozenset[str] = frozenset({"lora", "dora", "oft"})


def machine_cases(decl: Any) -> list[tuple[str, int]]:
    """The (method, bits) cases the machine runs for a declaration: its methods the machine models, each bit width."""
    return [(str(m), b) for m in sorted(decl.methods) if str(m) in MACHINE_METHODS for b in sorted(decl.bits)]


def variants(method: str) -> tuple[dict[str, Any], ...]:
    """The adapter variants a ``method`` machine draws from (a clear error for a method the machine does not know)."""
    try:
        return {"lora": LORA_VARIANTS, "dora": DORA_VARIANTS, "oft": OFT_VARIANTS}[method]
    except KeyError:
        raise ValueError(f"the stateful machine has no adapter variants for method {method!r}; "
                         "add them to conformance/clauses/stateful/config.py") from None


def variant_ok(method: str, index: int, caps: Iterable[str], bias: bool) -> bool:
    """Whether variant ``index`` may be drawn: every option in it is declared (``lora_bias`` also needs a base bias)."""
    params = variants(method)[index]
    caps = frozenset(caps)
    if any(cap not in caps for _, cap in params_needing(params)):  # options it lacks are never drawn
        return False
    return not params.get("lora_bias") or bias


def allowed_variants(method: str, caps: Iterable[str], bias: bool) -> list[int]:
    return [i for i in range(len(variants(method))) if variant_ok(method, i, caps, bias)]


@dataclass(frozen=True)
class MachineConfig(OnBase):
    """The layer a machine example starts from: the method, the base case, the first adapter's variant and the
    seed of the base's weights. JSON-able through :meth:`to_dict` / :meth:`from_dict` (the reproducer embeds it;
    the flat keys of every stored trace)."""

    method: str
    base: BaseCase
    variant: int = 0
    seed: int = 0

    #: the base fields every stored config carries, in their order (others are written when not at their default)
    BASE_KEYS: ClassVar[tuple[str, ...]] = ("bits", "in_features", "out_features", "quant_type", "double_quant",
                                            "blocksize", "bias")

    @classmethod
    def make(cls, method: str, bits: int, in_features: int = 64, out_features: int = 40, quant_type: str = "nf4",
             double_quant: bool = False, blocksize: int = 64, bias: bool = True, variant: int = 0,
             seed: int = 0, cpu_packed: bool = False) -> MachineConfig:
        """A config from its flat description (float32 compute dtype, float32 weight; ``cpu_packed``: bitsandbytes'
        CPU packed layout switched on, ``cases.BaseCase.cpu_packed``)."""
        return cls(method, BaseCase(bits, in_features, out_features, quant_type=quant_type, blocksize=blocksize,
                                    double_quant=double_quant, bias=bias, cpu_packed=cpu_packed), variant, seed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineConfig:
        """The config of a :meth:`to_dict` dict (a stored trace's ``create`` step without its ``op``)."""
        base = {k: v for k, v in d.items() if k not in ("method", "variant", "seed", "op")}
        return cls(d["method"], BaseCase.from_json({"out_features": 40, **base}), d.get("variant", 0), d.get("seed", 0))

    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_json()
        default = BaseCase(self.base.bits).to_json()
        extra = {f.name: base[f.name] for f in fields(BaseCase)
                 if f.name not in self.BASE_KEYS and base[f.name] != default[f.name]}
        return {"method": self.method, **{k: base[k] for k in self.BASE_KEYS}, **extra, "variant": self.variant,
                "seed": self.seed}

    @property
    def label(self) -> str:
        packed = "-cpupacked" if self.base.cpu_packed else ""
        return f"{self.method}-{self.base.quant_label}-{self.base.shape_label}{packed}-v{self.variant}"


def configs_for(method: str, bits: int, device: str = "cpu") -> list[MachineConfig]:
    """The base layers a (method, bits) machine on ``device`` draws from: both shapes, NF4/FP4, double quant; on a
    CPU whose bitsandbytes repacks 4-bit layers (``quant.layers.cpu_packed_layout_available``: AVX512-BF16), also
    bases with that packed layout switched on (appended: the list elsewhere is unchanged, and so are the draws)."""
    if bits == 8:
        return [MachineConfig.make(method, 8, i, o) for (i, o) in SHAPES]
    # blocksize divides in_features: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong otherwise
    # (the packed bytes are right, the dequantized weights are not)
    out = [MachineConfig.make(method, 4, 64, 40, "nf4", False, 64),
           MachineConfig.make(method, 4, 32, 24, "fp4", True, 32),
           MachineConfig.make(method, 4, 64, 40, "fp4", False, 64),
           MachineConfig.make(method, 4, 32, 24, "nf4", True, 32)]
    if torch.device(device).type == "cpu" and qlayers.cpu_packed_layout_available():
        i, o, bs = PACKED_SHAPE
        out += [MachineConfig.make(method, 4, i, o, "nf4", False, bs, cpu_packed=True),
                MachineConfig.make(method, 4, i, o, "fp4", True, bs, cpu_packed=True)]
    return out


def _size(trace: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Order of simplicity of a failing sequence: fewer steps, then smaller drawn numbers."""
    return len(trace), sum(len(str(s)) for s in trace)


@dataclass
class Stats:
    """Counters and worst ratios of one run (reported as measurements).

    A case runs an exploring pass (``exploring``, ``target`` None: every violation is recorded, and the
    example goes on with a fresh layer), then shrink passes (``target``: the keys not shrunk yet, allowed to
    raise, so hypothesis shrinks those it meets; the others are recorded and the example goes on with a
    fresh layer, as in the exploring pass; ``raised``: the target keys a pass met). ``explore_examples``/``explore_steps`` count the
    exploring pass only: a layer built (a fresh one after a violation included) is an example, and
    ``ended_early`` counts those a violation ended; the clauses' steps-per-example floor is judged on them.
    ``reached[clause][op]``: how often ``op`` reached the clause's invariant (over every pass).
    """

    examples: int = 0
    steps: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    explore_examples: int = 0
    explore_steps: int = 0
    ended_early: int = 0
    reached: dict[str, dict[str, int]] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    notes: set[str] = field(default_factory=set)
    #: the shortest violation seen per (clause, step kind), in the order first seen
    best: dict[tuple[str, str], Violation] = field(default_factory=dict)
    exploring: bool = True
    #: the keys a shrink pass lets raise (None: the exploring pass, where nothing raises)
    target: frozenset[tuple[str, str]] | None = None
    #: the target keys that raised in the current shrink pass (its hypothesis run shrinks them)
    raised: set[tuple[str, str]] = field(default_factory=set)
    #: keys whose shrink pass the time budget cut short
    cut: set[tuple[str, str]] = field(default_factory=set)
    shrink_passes: int = 0
    shrink_s: float = 20.0
    deadline: float | None = None
    stopped: bool = False
    #: set when a step raised a CUDA fault: the context is broken, the run stops (see Stats.tick)
    cuda_fault: str | None = None
    #: steps that started with the base in bitsandbytes' CPU packed layout (``quant.layers.is_cpu_packed``)
    steps_on_packed_layout: int = 0
    #: forwards in which bitsandbytes repacked the base into that layout (the model followed, ``Driver.follow_repack``)
    repacks: int = 0
    #: per listed situation (:class:`UpstreamFailure`): [how many steps met it, the first one's message]
    upstream: dict[str, list[Any]] = field(default_factory=dict)

    def start_example(self) -> None:
        self.examples += 1
        if self.exploring:
            self.explore_examples += 1

    def record(self, v: Violation) -> None:
        """Keep the shortest failing sequence per key (hypothesis' shrinking replays feed it); the shrink
        pass's time budget starts when one of its targets first raises."""
        if self.exploring:
            self.ended_early += 1
        old = self.best.get(v.key)
        if old is None or _size(v.trace) < _size(old.trace):
            self.best[v.key] = v
        if self.raises(v):
            self.raised.add(v.key)
            if self.deadline is None:
                self.deadline = time.monotonic() + self.shrink_s

    def raises(self, v: Violation) -> bool:
        """Whether ``v`` ends the example (a shrink pass's target) rather than being recorded and left behind."""
        return self.target is not None and not isinstance(v, UpstreamFailure) and v.key in self.target

    def met_upstream(self, f: UpstreamFailure) -> None:
        """Count a step that met a listed bitsandbytes failure (its first message is kept)."""
        entry = self.upstream.setdefault(f.situation, [0, f.message])
        entry[0] += 1

    def tick(self) -> None:
        if self.cuda_fault is not None:
            # every later CUDA call fails (the error is sticky), at points that depend on timing:
            # continuing would only make hypothesis see inconsistent runs (FlakyStrategyDefinition)
            self.stopped = True
            raise StopRun("CUDA context broken")
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped = True
            raise StopRun("shrink budget spent")

    def op(self, name: str) -> None:
        self.tick()
        self.ops[name] = self.ops.get(name, 0) + 1
        self.steps += 1
        if self.exploring:
            self.explore_steps += 1

    def reach(self, clause: str, op: str) -> None:
        by_op = self.reached.setdefault(clause, {})
        by_op[op] = by_op.get(op, 0) + 1

    def ratio(self, clause: str, value: float) -> None:
        if not math.isnan(value) and value > self.worst.get(clause, -1.0):
            self.worst[clause] = value

    def add(self, other: Stats) -> None:
        """Fold a case's counters into this (the run's total)."""
        for name in ("examples", "steps", "explore_examples", "explore_steps", "ended_early", "shrink_passes",
                     "steps_on_packed_layout", "repacks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, (n, message) in other.upstream.items():
            self.upstream.setdefault(key, [0, message])[0] += n
        for k, n in other.ops.items():
            self.ops[k] = self.ops.get(k, 0) + n
        for cid, by_op in other.reached.items():
            mine = self.reached.setdefault(cid, {})
            for op, n in by_op.items():
                mine[op] = mine.get(op, 0) + n
        for k, r in other.worst.items():
            self.ratio(k, r)
        self.notes |= other.notes
        self.stopped |= other.stopped
