"""Hypothesis state machine over an adapter layer's lifecycle (clauses STATE-*, issue #8).

Modelled on zarr's store state-machine tests and hypothesis' ``RuleBasedStateMachine``: a
:class:`Driver` (plain Python, no hypothesis) owns one layer built through the implementation
protocol (``impl.create(base, AdapterSpec(...))``) and a float64 :class:`~.model.LogicalModel`;
every step is a method that records itself (JSON-able dict) in ``driver.trace``, runs on the layer,
updates the model and checks the invariants, raising a :class:`Violation` tagged with the clause ID
it breaks. :func:`make_machine` wraps a driver in a ``RuleBasedStateMachine`` whose rules draw the
steps; :func:`run` runs it with a budget and turns hypothesis' shrunk failures into reproducer
scripts (:mod:`.reproducer`); :func:`replay` re-runs a recorded trace without hypothesis.
"""

from __future__ import annotations

import copy
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from torch import nn

from conformance.harness.loader import BUILTIN
from conformance.quant import layers as ql
from conformance.spec import oracle

# -- clauses ---------------------------------------------------------------------------------------
from conformance.spec.catalog.stateful import (
    ADAPTERS,
    BASE,
    DRIFT,
    FLAGS,
    INVALID,
    MERGE,
    OUTPUT,
    STATE_IDS,
    UNMERGE,
    VALID,
)
from conformance.spec.interface import AdapterSpec, Implementation, bits_of, methods_of, target_of
from conformance.spec.observe import implementation_warnings

from .model import AdapterModel, LogicalModel, _ratio, copy_tensors

CLAUSE_IDS = STATE_IDS

ENV_EXAMPLES = "CONFORMANCE_STATEFUL_EXAMPLES"
ENV_STEPS = "CONFORMANCE_STATEFUL_STEPS"
ENV_REPORT_DIR = "CONFORMANCE_REPORT_DIR"
ENV_SHRINK_S = "CONFORMANCE_STATEFUL_SHRINK_S"
DEFAULT_SHRINK_S = 20.0  # per (method, bits) case, from its first violation on
DEFAULT_EXAMPLES = 30  # per (method, bits) pair: the CI budget
DEFAULT_STEPS = 15


class StopRun(BaseException):  # noqa: N818  (not an error: ends a run whose shrink budget is spent)
    """Raised through hypothesis to end shrinking when the time budget is spent (see :class:`Stats`)."""


class Violation(AssertionError):
    """An invariant of clause ``clause`` does not hold after the last step of ``trace``."""

    clause: str = ""

    def __init__(self, message: str, trace: list[dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(f"{self.clause}: {message}")
        self.message = message
        self.trace = list(trace or [])
        self.config = dict(config or {})


#: one subclass per clause, so hypothesis treats violations of different clauses as distinct bugs
VIOLATIONS: dict[str, type[Violation]] = {
    cid: type("Violation_" + cid.replace("-", "_"), (Violation,), {"clause": cid}) for cid in CLAUSE_IDS
}

# -- what the machine draws from -----------------------------------------------------------------

#: (in_features, out_features): out_features not a power of two (issue #8)
SHAPES = ((64, 40), (32, 24))
LORA_VARIANTS: tuple[dict[str, Any], ...] = (
    {"r": 4, "lora_alpha": 8.0, "init_lora_weights": False},
    {"r": 2, "lora_alpha": 4.0, "init_lora_weights": False, "use_rslora": True},
    {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False, "lora_bias": True},
)
OFT_VARIANTS: tuple[dict[str, Any], ...] = (
    {"r": 4, "oft_block_size": 0, "init_weights": False},
    {"r": 0, "oft_block_size": 8, "init_weights": False},
    {"r": 0, "oft_block_size": 8, "init_weights": False, "block_share": True},
)
#: leading shapes of a forward's input (the last dimension is in_features)
INPUT_SHAPES = ((3,), (2, 3), (1,))
INPUT_DTYPES = ("float32", "float16", "bfloat16")
#: bitsandbytes' Linear8bitLt.forward casts its *bias* to the input dtype in place
#: (bitsandbytes/nn/modules.py): a bfloat16 input would round the base bias for good, a bnb
#: behaviour outside the adapter layer under test; 8-bit machines use float32/float16 inputs
INPUT_DTYPES_8BIT = ("float32", "float16")
GRAD_MODES = ("grad", "no_grad", "inference_mode")
#: adapter dtypes a dtype move goes to; OFT stays in float32/float64 (the Cayley solve, see report)
ADAPTER_DTYPES = {"lora": ("float32", "bfloat16", "float16"), "oft": ("float32", "float64")}
INVALID_KINDS = ("set_unknown", "merge_unknown", "unmerge_unmerged", "merge_merged", "delete_unknown",
                 "delete_merged", "add_existing", "mixed_when_merged", "mixed_unknown", "wrong_in_features")
MAX_ADAPTERS = 3
#: how often each op is drawn (relative), when it applies
OP_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("forward", 4), ("merge", 4), ("unmerge", 3), ("train_step", 2), ("add_adapter", 2), ("set_adapter", 2),
    ("invalid", 3), ("mixed_forward", 2), ("enable_adapters", 2), ("set_mode", 1), ("delete_adapter", 1),
    ("state_dict_roundtrip", 1), ("deepcopy", 1), ("dtype_move", 1), ("device_move", 1),
)
LR = 0.05


def _size(trace: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Order of simplicity of a failing sequence: fewer steps, then smaller drawn numbers."""
    return len(trace), sum(len(str(s)) for s in trace)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def seed_for(device: str, seed: int) -> None:
    """Seed the generators a step on ``device`` uses: the CPU one only unless the machine runs on CUDA.

    ``torch.manual_seed`` also seeds CUDA when the process initialised it; a CPU run on a GPU
    host must not touch the CUDA context (another test may have broken it).
    """
    if str(device).startswith("cuda"):
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


def _is_cuda_fault(exc: BaseException) -> bool:
    """A CUDA error that poisons the context (illegal memory access, launch failure, ...)."""
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in text


@dataclass(frozen=True)
class MachineConfig:
    """The layer a machine example starts from (JSON-able; the reproducer embeds it)."""

    method: str
    bits: int
    in_features: int = 64
    out_features: int = 40
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    bias: bool = True
    variant: int = 0
    seed: int = 0

    @property
    def label(self) -> str:
        q = "int8" if self.bits == 8 else self.quant_type + ("-dq" if self.double_quant else "")
        return f"{self.method}-{q}-{self.in_features}x{self.out_features}-v{self.variant}"

    def base_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"bits": self.bits, "bias": self.bias, "seed": self.seed}
        if self.bits == 4:
            kw.update(quant_type=self.quant_type, double_quant=self.double_quant, blocksize=self.blocksize)
        return kw


def variants(method: str) -> tuple[dict[str, Any], ...]:
    return LORA_VARIANTS if method == "lora" else OFT_VARIANTS


def configs_for(method: str, bits: int) -> list[MachineConfig]:
    """The base layers a (method, bits) machine draws from: both shapes, NF4/FP4, double quant."""
    if bits == 8:
        return [MachineConfig(method, 8, i, o) for (i, o) in SHAPES]
    # blocksize divides in_features: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong otherwise (see
    # the report of issue #8: the packed bytes are right, the dequantized weights are not)
    return [MachineConfig(method, 4, 64, 40, "nf4", False, 64), MachineConfig(method, 4, 32, 24, "fp4", True, 32),
            MachineConfig(method, 4, 64, 40, "fp4", False, 64), MachineConfig(method, 4, 32, 24, "nf4", True, 32)]


def impl_spec(impl: Implementation) -> str:
    """A string ``conformance.harness.loader.load`` resolves back to ``impl``: the one it was loaded from
    (``interface.target_of``), else its built-in name or its class."""
    spec = target_of(impl)
    if spec:
        return spec
    if impl.name in BUILTIN and type(impl).__module__.startswith("conformance.impls"):
        return impl.name
    return f"{type(impl).__module__}:{type(impl).__qualname__}"


@dataclass
class Stats:
    """Counters and worst ratios over a whole run (reported as measurements)."""

    examples: int = 0
    steps: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    notes: set[str] = field(default_factory=set)
    best: dict[str, Violation] = field(default_factory=dict)
    shrink_s: float = DEFAULT_SHRINK_S
    deadline: float | None = None
    stopped: bool = False
    #: set when a step raised a CUDA fault: the context is broken, the run stops (see Stats.tick)
    cuda_fault: str | None = None

    def record(self, v: Violation) -> None:
        """Keep the shortest failing sequence per clause (hypothesis' shrinking replays feed it)."""
        old = self.best.get(v.clause)
        if old is None or _size(v.trace) < _size(old.trace):
            self.best[v.clause] = v
        if self.deadline is None:
            self.deadline = time.monotonic() + self.shrink_s

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

    def ratio(self, clause: str, value: float) -> None:
        if not math.isnan(value) and value > self.worst.get(clause, -1.0):
            self.worst[clause] = value


# -- the driver ------------------------------------------------------------------------------------

class Driver:
    """One layer plus its float64 model; every public method is one recorded, checked step."""

    def __init__(self, impl: Implementation, config: MachineConfig, device: str = "cpu",
                 stats: Stats | None = None, verbose: Callable[[str], None] | None = None,
                 exclude_invalid: Sequence[str] = ()) -> None:
        self.impl = impl
        self.config = config
        self.device = device
        self.quant_device = device  # where the example's base layer was quantized
        self.stats = stats if stats is not None else Stats()
        self.stats.tick()
        self.verbose = verbose
        self.trace: list[dict[str, Any]] = []
        self._recording = True
        self.caps = frozenset(impl.capabilities)
        self.exclude_invalid = frozenset(exclude_invalid)
        self.limitations = dict(getattr(impl, "limitations", {}) or {})
        self.method = config.method
        self.trace.append({"op": "create", **asdict(config)})
        self._echo(self.trace[-1])
        base = self._fresh_base()
        params = dict(variants(self.method)[config.variant])
        if not self._variant_ok(params):
            params = dict(variants(self.method)[0])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seed_for(device, config.seed)
                self.layer = impl.create(base, AdapterSpec(self.method, "a0", params))
        except Exception as exc:
            self._fail(VALID, f"impl.create(base, AdapterSpec({self.method!r}, 'a0', {params})) raised "
                              f"{type(exc).__name__}: {exc}")
        self.model = LogicalModel.from_base(self.layer.base_layer)
        self.model.adapters["a0"] = AdapterModel(self.method, params, self._read("a0"))
        self.model.active = ["a0"]
        self.snap = ql.snapshot(self.layer.base_layer)
        self._counter = 1
        self._check_state()

    # -- helpers ------------------------------------------------------------------------------
    def _echo(self, step: dict[str, Any]) -> None:
        if self.verbose:
            self.verbose(render_step(step))

    def _fresh_base(self) -> nn.Module:
        """A base layer as the example's first one: quantized on the device the example started on.

        After a CPU<->CUDA move the layer lives elsewhere, but a fresh base quantized there would not
        be the same weights (bitsandbytes 0.50.2's CPU and CUDA ``quantize_4bit`` with double quant
        give different bytes for the same float weight), so it is quantized where the original was
        and then moved.
        """
        c = self.config
        base = ql.make_base_layer(c.in_features, c.out_features, device=self.quant_device, **c.base_kwargs())
        return ql.move_base_layer(base, self.device)

    def _variant_ok(self, params: dict[str, Any]) -> bool:
        if params.get("use_rslora") and "rslora" not in self.caps:  # capability-gated variants are left out
            return False
        return not params.get("lora_bias") or ("lora_bias" in self.caps and self.config.bias)

    def _bounded(self, clause: str, ratio: float, message: Callable[[], str]) -> None:
        """Record ``ratio`` (observed / analytic bound) for ``clause``; a violation unless it is <= 1 (NaN fails).

        ``message`` is built only on failure (``Expected.describe`` scans the whole output)."""
        self.stats.ratio(clause, ratio)
        if not ratio <= 1.0:
            self._fail(clause, f"{message()} (ratio {ratio:.3g})")

    def _fail(self, clause: str, message: str) -> None:
        v = VIOLATIONS[clause](f"[{self.config.label}, step {len(self.trace) - 1}: {render_step(self.trace[-1])}] "
                               f"{message}", self.trace, asdict(self.config))
        if self._recording:
            self.stats.record(v)
        raise v

    def _read(self, name: str) -> dict[str, torch.Tensor]:
        return copy_tensors(self.layer.adapter_parameters(name))

    def _record(self, op: str, **args: Any) -> dict[str, Any]:
        step = {"op": op, **args}
        self.trace.append(step)
        self.stats.op(op)
        self._echo(step)
        return step

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a valid step's call on the layer; any exception is a STATE-VALID-NEVER-RAISES violation."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn()
            if torch.cuda.is_available() and (str(self.device).startswith("cuda")
                                              or self.trace[-1].get("op") == "device_move"):
                # CUDA reports a kernel's fault at the next synchronisation: wait here so a fault is
                # attributed to the step that caused it, in every replay alike (hypothesis needs the
                # same choices to end the same way: see make_machine)
                torch.cuda.synchronize()
            return out
        except Violation:
            raise
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
            if _is_cuda_fault(exc):
                self.stats.cuda_fault = f"valid step {what} ({render_step(self.trace[-1])}) raised {exc}"
            self._fail(VALID, f"valid step {what} raised {type(exc).__name__}: {exc}{where}")

    @property
    def merged(self) -> bool:
        return bool(self.model.merged)

    @property
    def names(self) -> list[str]:
        return list(self.model.adapters)

    def mixed_ok(self) -> bool:
        return "mixed_batch" in self.caps and f"mixed_batch/{self.method}" not in self.limitations

    def _input(self, lead: Sequence[int], dtype: str, seed: int, in_features: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, in_features or self.config.in_features, generator=g)
        return x.to(device=self.device, dtype=dtype_of(dtype))

    # -- invariants ---------------------------------------------------------------------------
    def _check_flags(self, where: str = "") -> None:
        got = list(self.layer.merged_adapters)
        if got != self.model.merged or bool(self.layer.merged) != bool(self.model.merged):
            self._fail(FLAGS, f"{where}merged={self.layer.merged!r}, merged_adapters={got}; the sequence merged "
                              f"{self.model.merged} (merged={bool(self.model.merged)})")

    def _check_adapters(self, where: str = "", values_only: bool = False) -> None:
        names = sorted(self._layer_names())
        if names != sorted(self.model.adapters):
            self._fail(ADAPTERS, f"{where}layer has adapters {names}, the sequence made {sorted(self.model.adapters)}")
        active = list(self.layer.active_adapters)
        if active != self.model.active:
            self._fail(ADAPTERS, f"{where}active_adapters={active}, the sequence set {self.model.active}")
        if "disable_adapters" in self.caps and bool(self.layer.disable_adapters) != self.model.disabled:
            self._fail(ADAPTERS, f"{where}disable_adapters={self.layer.disable_adapters}, expected "
                                 f"{self.model.disabled}")
        for name, ad in self.model.adapters.items():
            got = self.layer.adapter_parameters(name)
            if set(got) != set(ad.tensors):
                self._fail(ADAPTERS, f"{where}adapter {name!r} has tensors {sorted(got)}, expected {sorted(ad.tensors)}")
            for k, t in ad.tensors.items():
                g = got[k].detach().cpu()
                same = (g.shape == t.shape and (g.double().equal(t.double()) if values_only
                                                else (g.dtype == t.dtype and g.equal(t))))
                if not same:
                    self._fail(ADAPTERS, f"{where}adapter {name!r} tensor {k} changed ({g.dtype} {tuple(g.shape)}, "
                                         f"expected {t.dtype} {tuple(t.shape)}, max |diff| "
                                         f"{_maxdiff(g, t)}) although no step should have changed it")

    def _layer_names(self) -> list[str]:
        names = getattr(self.layer, "adapter_names", None)
        if names is not None:
            return list(names)
        found = []
        for n in self.model.adapters:
            try:
                self.layer.adapter_parameters(n)
                found.append(n)
            except Exception:
                pass
        return found

    def _check_base(self, where: str = "") -> None:
        base = self.layer.base_layer
        try:
            snap = ql.snapshot(base)
        except Exception as exc:
            self._fail(BASE, f"{where}the base layer is no longer a quantized bnb layer: {exc}")
        diff = self.snap.differences(snap)
        if self.config.bits == 8 and "bias" in diff:
            # Linear8bitLt.forward re-types its bias in place (see INPUT_DTYPES_8BIT); the values are
            # compared below, through base_weights
            diff.remove("bias")
        if diff:
            self._fail(BASE, f"{where}the base layer's packed bytes / quant state changed ({', '.join(diff)}) "
                             "although no merge or unmerge happened")
        w, b = oracle.base_weights(base)
        if not w.equal(self.model.w):
            self._fail(BASE, f"{where}dequantize() of the base layer gives other weights than before "
                             f"(max |diff| {float((w - self.model.w).abs().max()):.3g})")
        if (b is None) != (self.model.b is None) or (b is not None and not b.equal(self.model.b)):
            diff = "n/a" if b is None or self.model.b is None else f"{float((b - self.model.b).abs().max()):.3g}"
            self._fail(BASE, f"{where}the base bias changed (max |diff| {diff})")

    def _check_state(self, base_changed: bool = False) -> None:
        self._check_flags()
        if not base_changed:
            self._check_base()
        self._check_adapters()

    def _check_output(self, y: Any, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> None:
        if not isinstance(y, torch.Tensor):
            self._fail(OUTPUT, f"forward returned {type(y).__name__}, not a tensor")
        if tuple(y.shape) != (*x.shape[:-1], self.config.out_features):
            self._fail(OUTPUT, f"output shape {tuple(y.shape)}, expected {(*x.shape[:-1], self.config.out_features)}")
        if y.dtype != x.dtype:
            self._fail(OUTPUT, f"output dtype {y.dtype} for a {x.dtype} input")
        exp = self.model.expected(self.layer.base_layer, x, adapter_names)
        self._bounded(OUTPUT, exp.ratio(y), lambda: (
            f"output differs from the float64 model beyond the analytic bound: {exp.describe(y)}; state: "
            f"active={self.model.active}, merged={self.model.merged}, disabled={self.model.disabled}, "
            f"training={self.model.training}, requantizations={self.model.requantizations}"))

    def _after_requant(self, names: Sequence[str], sign: int, what: str) -> None:
        """Check one merge/unmerge call that requantized once per name, then adopt the stored weights."""
        base = self.layer.base_layer
        try:
            w_act, b_act = oracle.base_weights(base)
        except Exception as exc:
            self._fail(MERGE, f"after {what} the base layer cannot be dequantized: {exc}")
        if ql.quant_settings(base) != self._settings:
            self._fail(MERGE, f"{what} changed the quantization settings: {self._settings} -> {ql.quant_settings(base)}")
        chains = self.model.run_ops(names, sign, base)
        r, where = chains["step"].ratio(w_act, b_act)
        self._bounded(MERGE, r, lambda: (
            f"{what} of {list(names)}: stored weights are not dequantize -> {'apply' if sign > 0 else 'remove'} "
            f"-> requantize of the previous weights within the bound: {where}"))
        r, where = chains["orig"].ratio(w_act, b_act)
        self._bounded(DRIFT, r, lambda: (
            f"after {self.model.requantizations} requantizations the stored weights drifted from the original "
            f"weights (with the merged adapters applied exactly) beyond the sum of the per-requantization bounds: "
            f"{where}"))
        self.model.w, self.model.b = w_act, b_act
        self.snap = ql.snapshot(base)

    def _after_unmerge_all(self) -> None:
        """The merged stack is empty again: weights back at the pre-merge ones (STATE-UNMERGE-RESTORES)."""
        ch = self.model.anchor
        # |stored - pre-merge| <= bound + |exact chain - pre-merge| (float64 residue of the exact model)
        resid_w = (ch.w - self.model.anchor_w).abs()
        ew = ch.ew + resid_w
        eb = None if ch.eb is None else ch.eb + (ch.b - self.model.anchor_b).abs()
        r, where = _ratio(self.model.w, self.model.anchor_w, ew, "weight", self.model.b, self.model.anchor_b, eb)
        self._bounded(UNMERGE, r, lambda: f"unmerge did not restore the pre-merge weights within the bound: {where}")
        self.model.reset_chains()

    @property
    def _settings(self) -> dict[str, Any]:
        s = getattr(self, "_settings_cache", None)
        if s is None:
            s = self._settings_cache = ql.quant_settings(self.layer.base_layer)
        return s

    def _pending_unmerge_on_forward(self) -> bool:
        return self.model.disabled and self.merged

    def _forward_unmerge(self) -> None:
        names = list(reversed(self.model.merged))
        self.model.merged = []
        self._after_requant(names, -1, "the unmerge a disabled forward performs")
        self._after_unmerge_all()

    # -- steps ---------------------------------------------------------------------------------
    def _bnb8_bias_cast(self, dtype: torch.dtype) -> None:
        """Linear8bitLt.forward does ``bias.data = bias.data.to(x.dtype)`` (bitsandbytes/nn/modules.py):
        a forward in a narrower dtype rounds the stored base bias for good. That is bitsandbytes, not the
        adapter layer, so the model follows it (the rounding is added to the chains' bias bounds)."""
        if self.config.bits != 8 or self.model.b is None:
            return
        new = self.model.b.to(dtype).double()
        if not new.equal(self.model.b):
            err = (new - self.model.b).abs()
            for ch in (self.model.anchor, self.model.orig):
                if ch is not None and ch.eb is not None:
                    ch.eb = ch.eb + err
            self.model.b = new
            self.stats.notes.add("8-bit: a forward rounded the base bias to the input dtype (bitsandbytes)")

    def forward(self, lead: Sequence[int], dtype: str, grad_mode: str, seed: int) -> None:
        self._record("forward", lead=list(lead), dtype=dtype, grad_mode=grad_mode, seed=seed)
        x = self._input(lead, dtype, seed)
        ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
        unmerges = self._pending_unmerge_on_forward()

        def go() -> torch.Tensor:
            with ctx():
                return self.layer(x)

        y = self._call(f"forward under {grad_mode}", go)
        if unmerges:
            self._forward_unmerge()
        self._bnb8_bias_cast(x.dtype)
        self._check_state(base_changed=unmerges)
        self._check_output(y, x)

    def mixed_forward(self, picks: Sequence[int], dtype: str, seed: int) -> None:
        choices = ["__base__", *self.names]
        names = [choices[p % len(choices)] for p in picks]
        self._record("mixed_forward", adapter_names=names, dtype=dtype, seed=seed)
        x = self._input((len(names),), dtype, seed)

        def go() -> torch.Tensor:
            with torch.no_grad():
                return self.layer(x, adapter_names=names)

        y = self._call("forward with adapter_names", go)
        self._bnb8_bias_cast(x.dtype)
        self._check_state()
        self._check_output(y, x, names)

    def train_step(self, lead: Sequence[int], seed: int) -> None:
        self._record("train_step", lead=list(lead), seed=seed, lr=LR)
        x = self._input(lead, "float32", seed)
        g = torch.randn(*lead, self.config.out_features, generator=torch.Generator().manual_seed(seed + 1))
        unmerges = self._pending_unmerge_on_forward()
        holder: dict[str, torch.Tensor] = {}

        def go() -> None:
            with torch.enable_grad():
                y = self.layer(x)
                holder["y"] = y.detach()
                params = [p for n in self.names for p in self.layer.adapter_parameters(n).values()]
                for p in params:
                    p.grad = None
                loss = (y.float() * g.to(y.device)).sum()
                if loss.requires_grad:
                    loss.backward()
                opt_params = [p for p in params if p.grad is not None]
                if opt_params:
                    torch.optim.SGD(opt_params, lr=LR).step()
                for p in params:
                    p.grad = None

        self._call("forward + backward + SGD step", go)
        if unmerges:
            self._forward_unmerge()
        self._bnb8_bias_cast(x.dtype)
        self._check_flags()
        if not unmerges:
            self._check_base()
        self._check_output(holder["y"], x)
        trainable = set() if (self.model.disabled or self.merged) else set(self.model.active)
        for name, ad in self.model.adapters.items():
            new = self._read(name)
            changed = any(not new[k].equal(ad.tensors[k]) for k in ad.tensors if k in new)
            if changed and name not in trainable:
                self._fail(ADAPTERS, f"an optimizer step changed adapter {name!r}, which is not trained in this "
                                     f"state (active={self.model.active}, merged={self.model.merged}, "
                                     f"disabled={self.model.disabled})")
            if changed:
                ad.tensors = new
        self._check_adapters()

    def set_mode(self, training: bool) -> None:
        self._record("set_mode", training=training)
        self._call("train()/eval()", lambda: self.layer.train(training))
        self.model.training = training
        self._check_state()

    def merge(self, names: Sequence[str] | None, safe: bool) -> None:
        self._record("merge", adapter_names=None if names is None else list(names), safe_merge=safe)
        want = list(self.model.active if names is None else names)
        todo = [n for n in want if n not in self.model.merged]
        self._call("merge", lambda: self.layer.merge(safe_merge=safe, adapter_names=None if names is None
                                                     else list(names)))
        got = list(self.layer.merged_adapters)[len(self.model.merged):]
        if sorted(got) == sorted(todo) and got != todo:
            # the order of application is the implementation's (the reference merges OFT adapters in reverse
            # forward order so the merged layer equals the stacked rotations; PEFT in the order given): the
            # model follows the order the layer reports and checks the weights against it
            self.stats.notes.add(f"{self.method}: merge({todo}) applied in the order {got}")
            todo = got
        self.model.merged += todo
        self._check_flags()
        if todo:
            self._after_requant(todo, +1, "merge")
        else:
            self._check_base()
        self._check_adapters()

    def unmerge(self) -> None:
        self._record("unmerge")
        names = list(reversed(self.model.merged))
        self._call("unmerge", self.layer.unmerge)
        self.model.merged = []
        self._check_flags()
        self._after_requant(names, -1, "unmerge")
        self._after_unmerge_all()
        self._check_adapters()

    def add_adapter(self, variant: int, seed: int) -> None:
        params = dict(variants(self.method)[variant])
        if not self._variant_ok(params):
            variant, params = 0, dict(variants(self.method)[0])
        name = f"a{self._counter}"
        self._counter += 1
        self._record("add_adapter", name=name, variant=variant, params=params, seed=seed)

        def go() -> None:
            seed_for(self.device, seed)
            self.layer.add_adapter(name, **params)

        self._call(f"add_adapter({name!r})", go)
        if name not in self._layer_names():
            self._fail(ADAPTERS, f"add_adapter({name!r}) did not add it (layer has {self._layer_names()})")
        self.model.adapters[name] = AdapterModel(self.method, params, self._read(name))
        self._check_state()

    def set_adapter(self, names: Sequence[str]) -> None:
        self._record("set_adapter", adapter_names=list(names))
        self._call("set_adapter", lambda: self.layer.set_adapter(list(names)))
        self.model.active = list(names)
        self._check_state()

    def delete_adapter(self, name: str) -> None:
        self._record("delete_adapter", name=name)
        self._call(f"delete_adapter({name!r})", lambda: self.layer.delete_adapter(name))
        del self.model.adapters[name]
        active = [n for n in self.model.active if n != name]
        if not active and name in self.model.active:
            # the only active adapter was deleted: implementations may leave none active (reference) or
            # activate the first remaining one by name (PEFT BaseTunerLayer.delete_adapter, with a warning)
            got = list(self.layer.active_adapters)
            allowed = ([], sorted(self.model.adapters)[:1])
            if got not in allowed:
                self._fail(ADAPTERS, f"after deleting the only active adapter {name!r} active_adapters={got}; "
                                     f"expected one of {list(allowed)}")
            active = got
            self.stats.notes.add(f"delete of the only active adapter leaves active={got or '[]'}")
        self.model.active = active
        self._check_state()

    def enable_adapters(self, enabled: bool) -> None:
        self._record("enable_adapters", enabled=enabled)
        self._call("enable_adapters", lambda: self.layer.enable_adapters(enabled))
        self.model.disabled = not enabled
        self._check_state()

    def state_dict_roundtrip(self, seed: int) -> None:
        """state_dict() of the adapter tensors, loaded into a fresh layer over a fresh base."""
        self._record("state_dict_roundtrip", seed=seed)
        base_prefix = _module_prefix(self.layer, self.layer.base_layer)
        sd = {k: v for k, v in self.layer.state_dict().items()
              if base_prefix is None or not (k == base_prefix or k.startswith(base_prefix + "."))}
        names = self.names
        first = self.model.adapters[names[0]]
        holder: dict[str, Any] = {}

        def go() -> None:
            seed_for(self.device, seed)
            fresh = self.impl.create(self._fresh_base(), AdapterSpec(self.method, names[0], dict(first.params)))
            for n in names[1:]:
                fresh.add_adapter(n, **self.model.adapters[n].params)
            fresh.set_adapter(list(self.model.active))
            if self.model.disabled:
                fresh.enable_adapters(False)
            fresh.train(self.model.training)
            for n, ad in self.model.adapters.items():  # the same dtype moves as the saved layer
                for k, p in fresh.adapter_parameters(n).items():
                    if k in ad.tensors and p.dtype != ad.tensors[k].dtype:
                        p.data = p.data.to(ad.tensors[k].dtype)
            holder["res"] = fresh.load_state_dict(sd, strict=False)
            holder["layer"] = fresh

        self._call("build a fresh layer and load_state_dict", go)
        res = holder["res"]
        fresh = holder["layer"]
        fresh_prefix = _module_prefix(fresh, fresh.base_layer)
        missing = [k for k in res.missing_keys
                   if fresh_prefix is None or not (k == fresh_prefix or k.startswith(fresh_prefix + "."))]
        if missing or res.unexpected_keys:
            self._fail(ADAPTERS, f"state_dict round trip: keys missing in the saved state {missing}, unexpected "
                                 f"{list(res.unexpected_keys)}")
        self.layer = fresh
        self.model.w, self.model.b = oracle.base_weights(fresh.base_layer)
        if not self.model.w.equal(self.model.w_orig):
            self._fail(BASE, "a fresh base built with the same settings dequantizes to other weights than the "
                             "original one")
        self.model.reset_chains(original=True)
        self.snap = ql.snapshot(fresh.base_layer)
        self._check_flags(where="after the state_dict round trip: ")
        self._check_adapters(where="after the state_dict round trip: ")

    def deepcopy(self) -> None:
        self._record("deepcopy")
        self.layer = self._call("copy.deepcopy(layer)", lambda: copy.deepcopy(self.layer))
        self._check_state()

    def dtype_move(self, dtype: str) -> None:
        self._record("dtype_move", dtype=dtype)
        dt = dtype_of(dtype)

        def go() -> None:
            for n in self.names:
                for p in self.layer.adapter_parameters(n).values():
                    p.data = p.data.to(dt)

        self._call(f"adapter parameters .to({dtype})", go)
        for ad in self.model.adapters.values():
            ad.tensors = {k: v.to(dt) for k, v in ad.tensors.items()}
        self._check_state()

    def device_move(self, device: str) -> None:
        self._record("device_move", device=device)
        self.layer = self._call(f"layer.to({device!r})", lambda: self.layer.to(device))
        self.device = device
        # Checked before any kernel runs on the moved layer: a tensor left on the other device is
        # reported here instead of crashing the process at the next forward (see conformance.quant.layers.tensors_off_device;
        # finding: bitsandbytes 0.50.2 Linear8bitLt.state.CB/SCB stay behind when a parent module is
        # moved, because nn.Module.to() reaches children through _apply, not their .to()).
        stale = ql.tensors_off_device(self.layer, device)
        if stale:
            self._fail(VALID, f"device_move: layer.to({device!r}) left tensors on another device: "
                              f"{', '.join(stale[:6])}{' ...' if len(stale) > 6 else ''}; a forward would hand "
                              "them to the kernels of the new device (on CUDA: an illegal memory access)")
        self._check_state()

    # -- invalid steps -----------------------------------------------------------------------------
    def applicable_invalid(self, kind: str) -> bool:
        caps = self.caps
        if kind in self.exclude_invalid:
            return False
        return {
            "set_unknown": True, "merge_unknown": True, "unmerge_unmerged": not self.merged and "unmerge" in caps,
            "merge_merged": self.merged, "delete_unknown": "delete_adapter" in caps,
            "delete_merged": self.merged and "delete_adapter" in caps,
            "add_existing": "multi_adapter" in caps, "mixed_when_merged": self.merged and self.mixed_ok(),
            "mixed_unknown": not self.merged and self.mixed_ok(), "wrong_in_features": True,
        }[kind]

    def invalid(self, kind: str, seed: int) -> None:
        if not self.applicable_invalid(kind):
            kind = next((k for k in (*INVALID_KINDS[INVALID_KINDS.index(kind):], *INVALID_KINDS)
                         if self.applicable_invalid(k)), "wrong_in_features")
        self._record("invalid", kind=kind, seed=seed)
        first = self.names[0]
        x = self._input((2,), "float32", seed)
        calls: dict[str, tuple[str, Callable[[], Any]]] = {
            "set_unknown": ("set_adapter(['nope'])", lambda: self.layer.set_adapter(["nope"])),
            "merge_unknown": ("merge(adapter_names=['nope'])", lambda: self.layer.merge(adapter_names=["nope"])),
            "unmerge_unmerged": ("unmerge() with nothing merged", lambda: self.layer.unmerge()),
            "merge_merged": (f"merge(adapter_names={self.model.merged[:1]}) of a merged adapter",
                             lambda: self.layer.merge(adapter_names=self.model.merged[:1])),
            "delete_unknown": ("delete_adapter('nope')", lambda: self.layer.delete_adapter("nope")),
            "delete_merged": (f"delete_adapter({self.model.merged[:1]}) of a merged adapter",
                              lambda: self.layer.delete_adapter(self.model.merged[0])),
            "add_existing": (f"add_adapter({first!r}) of an existing adapter",
                             lambda: self.layer.add_adapter(first, **self.model.adapters[first].params)),
            "mixed_when_merged": ("forward(x, adapter_names=...) while merged",
                                  lambda: self.layer(x, adapter_names=[first, "__base__"])),
            "mixed_unknown": ("forward(x, adapter_names=['nope', ...])",
                              lambda: self.layer(x, adapter_names=["nope", first])),
            "wrong_in_features": ("forward of an input with in_features + 1",
                                  lambda: self.layer(self._input((2,), "float32", seed, self.config.in_features + 1))),
        }
        what, fn = calls[kind]
        raised: BaseException | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.no_grad():
                    fn()
            except Exception as exc:
                raised = exc
        warned = [t for t in implementation_warnings(caught) if t.strip()]
        self.stats.notes.add(f"invalid {kind}: " + (f"raises {type(raised).__name__}" if raised else
                                                    "warns" if warned else "silent"))
        where = f"invalid step {what}: "
        self._recording = False  # a broken invariant here is reported as STATE-INVALID-STEP-SAFE only
        try:
            self._check_flags(where)
            self._check_base(where)
            self._check_adapters(where)
        except Violation as v:
            self._recording = True
            how = f"raised {type(raised).__name__}" if raised else "warned" if warned else "was silently accepted"
            w = VIOLATIONS[INVALID](f"{v.message} (the invalid step {how} but changed the state: {v.clause})",
                                    v.trace, v.config)
            self.stats.record(w)
            raise w from None
        if raised is None and not warned:
            self._fail(INVALID, f"{where}was silently accepted: no exception and no warning")


def _module_prefix(root: nn.Module, target: nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return "n/a (shapes differ)"
    return f"{float((a.double() - b.double()).abs().max()):.3g}" if a.numel() else "0"


# -- rendering and replay -----------------------------------------------------------------------

#: steps rendered by a format string over the recorded arguments (``name`` and ``device`` quoted)
_RENDER = {
    "merge": "layer.merge(safe_merge={safe_merge}, adapter_names={adapter_names})",
    "unmerge": "layer.unmerge()",
    "add_adapter": "torch.manual_seed({seed}); layer.add_adapter({name}, **{params})",
    "set_adapter": "layer.set_adapter({adapter_names})",
    "delete_adapter": "layer.delete_adapter({name})",
    "enable_adapters": "layer.enable_adapters({enabled})",
    "state_dict_roundtrip": "fresh = impl.create(fresh base, same adapters, seed {seed}); "
                            "fresh.load_state_dict(adapter entries of layer.state_dict()); layer = fresh",
    "deepcopy": "layer = copy.deepcopy(layer)",
    "dtype_move": "for every adapter parameter p: p.data = p.data.to(torch.{dtype})",
    "device_move": "layer = layer.to({device})",
    "invalid": "<invalid step {kind}> (must raise or warn and change nothing)",
}


def render_step(step: dict[str, Any]) -> str:
    """A step as the plain calls it makes on the layer (for messages and reproducers)."""
    op = step["op"]
    a = {k: v for k, v in step.items() if k != "op"}
    if op == "create":
        cfg = MachineConfig(**a)
        params = variants(cfg.method)[cfg.variant]
        return (f"base = make_base_layer({cfg.in_features}, {cfg.out_features}, **{cfg.base_kwargs()}); "
                f"torch.manual_seed({cfg.seed}); layer = impl.create(base, AdapterSpec({cfg.method!r}, 'a0', {params}))")
    if op == "forward":
        return (f"x = randn({(*a['lead'], 'in')}, seed={a['seed']}).to({a['dtype']}); "
                f"with torch.{ {'grad': 'enable_grad', 'no_grad': 'no_grad'}.get(a['grad_mode'], a['grad_mode'])}(): "
                "y = layer(x)")
    if op == "mixed_forward":
        return (f"x = randn(({len(a['adapter_names'])}, in), seed={a['seed']}).to({a['dtype']}); "
                f"y = layer(x, adapter_names={a['adapter_names']})")
    if op == "train_step":
        return (f"x = randn({(*a['lead'], 'in')}, seed={a['seed']}); (layer(x) * g).sum().backward(); "
                f"SGD(adapter params with grad, lr={a['lr']}).step()")
    if op == "set_mode":
        return "layer.train()" if a["training"] else "layer.eval()"
    if op in _RENDER:
        return _RENDER[op].format(**{k: repr(v) if k in ("name", "device") else v for k, v in a.items()})
    return f"{op}({a})"


class StepNotApplicable(ValueError):
    """A recorded step that the machine would not have drawn in the replayed state (e.g. it names an
    adapter whose ``add_adapter`` the minimizer deleted): replaying it would test an invalid step as
    if it were valid."""


def op_applies(d: Driver, op: str, cuda: bool) -> bool:
    """Whether the machine may draw ``op`` now: the implementation's capabilities and the layer's state."""
    caps, merged = d.caps, d.model.merged
    return {
        "mixed_forward": d.mixed_ok() and not merged,
        "unmerge": bool(merged) and "unmerge" in caps,
        "add_adapter": "multi_adapter" in caps and len(d.names) < MAX_ADAPTERS,
        "set_adapter": "multi_adapter" in caps,
        "delete_adapter": "delete_adapter" in caps and len(d.names) > 1 and any(n not in merged for n in d.names),
        "enable_adapters": "disable_adapters" in caps,
        "state_dict_roundtrip": not merged,
        "dtype_move": not merged,
        "device_move": cuda,
    }.get(op, True)


def _applies(d: Driver, op: str, a: dict[str, Any]) -> bool:
    """``op_applies`` plus what the machine's draws guarantee about a recorded step's arguments."""
    if not op_applies(d, op, cuda=op == "device_move"):
        return False
    merged = d.model.merged
    if op == "merge":
        names = a["adapter_names"]
        if names is None:
            return any(n not in merged for n in d.model.active)
        return bool(names) and all(n in d.names and n not in merged for n in names)
    if op == "set_adapter":
        return bool(a["adapter_names"]) and all(n in d.names for n in a["adapter_names"])
    if op == "delete_adapter":
        return a["name"] in d.names and a["name"] not in merged
    if op == "mixed_forward":
        return all(n in ("__base__", *d.names) for n in a["adapter_names"])
    if op == "device_move":
        return a["device"] != str(d.device)
    return True


def apply_step(driver: Driver, step: dict[str, Any]) -> None:
    """Re-run one recorded step on ``driver``; ``StepNotApplicable`` if the machine could not have drawn it."""
    op = step["op"]
    a = {k: v for k, v in step.items() if k != "op"}
    if not _applies(driver, op, a):
        raise StepNotApplicable(f"step {render_step(step)} does not apply after the steps before it")
    if op == "forward":
        driver.forward(a["lead"], a["dtype"], a["grad_mode"], a["seed"])
    elif op == "mixed_forward":
        names = ["__base__", *driver.names]
        driver.mixed_forward([names.index(n) for n in a["adapter_names"]], a["dtype"], a["seed"])
    elif op == "train_step":
        driver.train_step(a["lead"], a["seed"])
    elif op == "set_mode":
        driver.set_mode(a["training"])
    elif op == "merge":
        driver.merge(a["adapter_names"], a["safe_merge"])
    elif op == "unmerge":
        driver.unmerge()
    elif op == "add_adapter":
        driver.add_adapter(a["variant"], a["seed"])
    elif op == "set_adapter":
        driver.set_adapter(a["adapter_names"])
    elif op == "delete_adapter":
        driver.delete_adapter(a["name"])
    elif op == "enable_adapters":
        driver.enable_adapters(a["enabled"])
    elif op == "state_dict_roundtrip":
        driver.state_dict_roundtrip(a["seed"])
    elif op == "deepcopy":
        driver.deepcopy()
    elif op == "dtype_move":
        driver.dtype_move(a["dtype"])
    elif op == "device_move":
        driver.device_move(a["device"])
    elif op == "invalid":
        driver.invalid(a["kind"], a["seed"])
    else:
        raise ValueError(f"unknown step {op!r}")


def replay(impl: Implementation, config: dict[str, Any], steps: Sequence[dict[str, Any]], device: str = "cpu",
           verbose: Callable[[str], None] | None = None) -> Violation | None:
    """Re-run a recorded sequence (``steps`` without the leading ``create``); the violation, if any."""
    try:
        driver = Driver(impl, MachineConfig(**config), device, verbose=verbose)
        for step in steps:
            if step["op"] != "create":
                apply_step(driver, step)
    except Violation as v:
        return v
    return None


def minimize(impl: Implementation, v: Violation, device: str = "cpu", budget_s: float = 10.0,
             exclude_invalid: Sequence[str] = ()) -> Violation:
    """Delete steps from a failing sequence while it still violates the same clause (delta debugging).

    A cheap pass after hypothesis' own shrinking, which a time budget may have cut: each
    candidate is one replay. Deterministic; stops after ``budget_s`` seconds.
    """
    deadline = time.monotonic() + budget_s
    best = v
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        steps = [s for s in best.trace if s["op"] != "create"]
        for i in reversed(range(len(steps))):
            if time.monotonic() > deadline:
                break
            cand = steps[:i] + steps[i + 1:]
            try:
                driver = Driver(impl, MachineConfig(**best.config), device, exclude_invalid=exclude_invalid)
                driver._recording = False
                for step in cand:
                    apply_step(driver, step)
            except Violation as nv:
                if nv.clause == best.clause and len(nv.trace) < len(best.trace):
                    best, improved = nv, True
                    break
            except Exception:  # noqa: BLE001  (a candidate that breaks the replay is just rejected)
                continue
    return best


# -- the hypothesis machine ----------------------------------------------------------------------

def make_machine(impl: Implementation, configs: Sequence[MachineConfig], device: str = "cpu",
                 stats: Stats | None = None, exclude_invalid: Sequence[str] = ()) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class driving ``impl``'s layers over ``configs``.

    ``exclude_invalid`` drops invalid-step kinds (to look past a known finding)."""
    stats = stats if stats is not None else Stats()
    caps = frozenset(impl.capabilities)
    seeds = st.integers(0, 2**16)
    # CPU<->CUDA moves only in a machine run for CUDA: a CPU run on a GPU host stays on the CPU
    cuda = device == "cuda" and torch.cuda.is_available() and "cuda" in caps
    in_dtypes = INPUT_DTYPES_8BIT if any(c.bits == 8 for c in configs) else INPUT_DTYPES

    class AdapterLayerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.d: Driver | None = None

        @initialize(config=st.sampled_from(list(configs)), variant=st.integers(0, 2), seed=seeds)
        def create(self, config: MachineConfig, variant: int, seed: int) -> None:
            stats.examples += 1
            self.d = Driver(impl, MachineConfig(**{**asdict(config), "variant": variant, "seed": seed}), device,
                            stats, exclude_invalid=exclude_invalid)

        @rule(data=st.data())
        def step(self, data: st.DataObject) -> None:
            """One step, drawn from the ops that apply now with the weights of OP_WEIGHTS.

            A single dispatching rule (rather than one rule per op) controls the mix: hypothesis'
            per-rule selection with swarm testing starved merges and forwards in small budgets.
            """
            d = self.d
            ops = [op for op, w in OP_WEIGHTS for _ in range(w) if op_applies(d, op, cuda)]
            op = data.draw(st.sampled_from(ops), label="op")
            if op == "forward":
                d.forward(data.draw(st.sampled_from(INPUT_SHAPES)), data.draw(st.sampled_from(in_dtypes)),
                          data.draw(st.sampled_from(GRAD_MODES)), data.draw(seeds))
            elif op == "mixed_forward":
                d.mixed_forward(data.draw(st.lists(st.integers(0, MAX_ADAPTERS), min_size=2, max_size=4)),
                                data.draw(st.sampled_from(in_dtypes)), data.draw(seeds))
            elif op == "train_step":
                d.train_step(data.draw(st.sampled_from(INPUT_SHAPES[:2])), data.draw(seeds))
            elif op == "set_mode":
                d.set_mode(data.draw(st.booleans()))
            elif op == "merge":
                unmerged = [n for n in d.names if n not in d.model.merged]
                use_active = data.draw(st.booleans(), label="adapter_names=None")
                if use_active and any(n not in d.model.merged for n in d.model.active):
                    d.merge(None, data.draw(st.booleans(), label="safe_merge") and "safe_merge" in d.caps)
                elif unmerged:
                    names = data.draw(st.lists(st.sampled_from(unmerged), min_size=1, max_size=2, unique=True),
                                      label="adapter_names")
                    d.merge(names, data.draw(st.booleans(), label="safe_merge") and "safe_merge" in d.caps)
                elif "unmerge" in d.caps:
                    d.unmerge()
            elif op == "unmerge":
                d.unmerge()
            elif op == "add_adapter":
                d.add_adapter(data.draw(st.integers(0, len(variants(d.method)) - 1)), data.draw(seeds))
            elif op == "set_adapter":
                d.set_adapter(data.draw(st.lists(st.sampled_from(d.names), min_size=1, max_size=2, unique=True),
                                        label="adapter_names"))
            elif op == "delete_adapter":
                d.delete_adapter(data.draw(st.sampled_from([n for n in d.names if n not in d.model.merged])))
            elif op == "enable_adapters":
                d.enable_adapters(data.draw(st.booleans()))
            elif op == "state_dict_roundtrip":
                d.state_dict_roundtrip(data.draw(seeds))
            elif op == "deepcopy":
                d.deepcopy()
            elif op == "dtype_move":
                d.dtype_move(data.draw(st.sampled_from(ADAPTER_DTYPES[d.method])))
            elif op == "device_move":
                d.device_move("cpu" if str(d.device).startswith("cuda") else "cuda")
            else:
                d.invalid(data.draw(st.sampled_from(INVALID_KINDS)), data.draw(seeds))

    AdapterLayerMachine.__name__ = AdapterLayerMachine.__qualname__ = f"AdapterLayerMachine_{impl.name}"
    return AdapterLayerMachine


# -- running with a budget -------------------------------------------------------------------------

@dataclass
class Failure:
    clause: str
    message: str
    config: dict[str, Any]
    trace: list[dict[str, Any]]
    reproducer: str | None = None

    def minimal_sequence(self) -> str:
        return "\n".join(f"  {i}. {render_step(s)}" for i, s in enumerate(self.trace))


@dataclass
class RunResult:
    implementation: str
    version: str
    device: str
    examples_per_case: int
    steps_per_example: int
    cases: list[str]
    wall_s: float = 0.0
    stats: Stats = field(default_factory=Stats)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"stateful machine, implementation {self.implementation} ({self.version}) on {self.device}: "
                 f"{self.stats.examples} examples, {self.stats.steps} steps over {', '.join(self.cases)} "
                 f"({self.examples_per_case} examples x <= {self.steps_per_example} steps each) in {self.wall_s:.1f}s",
                 "worst observed/bound ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(self.stats.worst.items())),
                 "steps run: " + ", ".join(f"{k} {v}" for k, v in sorted(self.stats.ops.items()))]
        if not self.failures and not self.errors:
            lines.append("no violations")
        for cid, fails in self.failures.items():
            for f in fails:
                lines += [f"VIOLATION {cid}: {f.message}", "minimal sequence:", f.minimal_sequence(),
                          f"reproducer: {f.reproducer}"]
        for e in self.errors:
            lines.append(f"ERROR (machine): {e}")
        return "\n".join(lines)


def budget(examples: int | None = None, steps: int | None = None) -> tuple[int, int]:
    """(examples per (method, bits) case, steps per example): arguments, else env vars, else CI defaults."""
    ex = examples if examples is not None else int(os.environ.get(ENV_EXAMPLES, DEFAULT_EXAMPLES))
    sp = steps if steps is not None else int(os.environ.get(ENV_STEPS, DEFAULT_STEPS))
    return max(1, ex), max(1, sp)


def report_dir(out: str | None = None) -> str:
    """Where reproducers go: ``out``, else $CONFORMANCE_REPORT_DIR, else a fresh temporary directory."""
    import tempfile

    path = out or os.environ.get(ENV_REPORT_DIR) or tempfile.mkdtemp(prefix="conformance-stateful-")
    os.makedirs(path, exist_ok=True)
    return path


def _flatten(exc: BaseException) -> list[BaseException]:
    subs = getattr(exc, "exceptions", None)  # BaseExceptionGroup (hypothesis' multiple bugs)
    if isinstance(subs, tuple | list):
        return [e for sub in subs for e in _flatten(sub)]
    return [exc]


def run(impl: Implementation, device: str = "cpu", *, examples: int | None = None, steps: int | None = None,
        cases: Sequence[tuple[str, int]] | None = None, out: str | None = None,
        derandomize: bool = True, shrink_s: float | None = None, exclude_invalid: Sequence[str] = ()) -> RunResult:
    """Run the machine for every (method, bits) case of ``impl``; write reproducers for failures.

    Hypothesis generates the sequences and shrinks a failing one; every failing replay is recorded
    and the shortest sequence per clause is reported. Shrinking stops ``shrink_s`` seconds after a
    case's first violation ($CONFORMANCE_STATEFUL_SHRINK_S) so a failing implementation cannot
    blow the CI budget; the sequence reported is then the shortest found so far.
    """
    n_ex, n_steps = budget(examples, steps)
    shrink = shrink_s if shrink_s is not None else float(os.environ.get(ENV_SHRINK_S, DEFAULT_SHRINK_S))
    pairs = list(cases) if cases is not None else [(m, b) for m in sorted(methods_of(impl)) for b in sorted(bits_of(impl))]
    result = RunResult(impl.name, str(impl.version()), device, n_ex, n_steps, [f"{m}/{b}bit" for m, b in pairs])
    start = time.perf_counter()
    # Tiny tensors: with several intra-op threads on a loaded 2-core machine every op pays OpenMP
    # wake-up/spin costs (~0.1 s per index_add_ measured, vs 10 us on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_cases(impl, device, pairs, n_ex, n_steps, shrink, derandomize, out, result, exclude_invalid)
    finally:
        torch.set_num_threads(threads)
    result.wall_s = time.perf_counter() - start
    return result


def _run_cases(impl: Implementation, device: str, pairs: Sequence[tuple[str, int]], n_ex: int, n_steps: int,
               shrink: float, derandomize: bool, out: str | None, result: RunResult,
               exclude_invalid: Sequence[str] = ()) -> None:
    from .reproducer import write_reproducer

    total = result.stats
    for method, bits in pairs:
        if total.cuda_fault is not None:
            result.errors.append(f"{method}/{bits}bit: not run: the CUDA context broke in an earlier case")
            continue
        cs = Stats(shrink_s=shrink)
        machine = make_machine(impl, configs_for(method, bits), device, cs, exclude_invalid)
        conf = settings(max_examples=n_ex, stateful_step_count=n_steps, derandomize=derandomize, deadline=None,
                        database=None, print_blob=False, report_multiple_bugs=True,
                        suppress_health_check=list(HealthCheck))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_state_machine_as_test(machine, settings=conf)
        except StopRun:
            pass
        except BaseException as exc:  # noqa: BLE001  (hypothesis raises groups of failures)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            for e in _flatten(exc):
                if isinstance(e, StopRun | Violation) or cs.stopped:
                    # after StopRun hypothesis may report the interrupted test case as flaky: an artifact
                    continue
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])
                result.errors.append(f"{method}/{bits}bit: {type(e).__name__}: {e} {tb}")
        if cs.cuda_fault is not None:
            total.cuda_fault = cs.cuda_fault
            result.errors.append(f"{method}/{bits}bit: the CUDA context broke (sticky error; the run stops here): "
                                 f"{cs.cuda_fault}")
        for v in cs.best.values():
            if cs.cuda_fault is None:  # replays would fail anywhere once the context is broken
                v = minimize(impl, v, device, min(10.0, shrink), exclude_invalid)
            f = Failure(v.clause, v.message, v.config, v.trace)
            try:
                f.reproducer = write_reproducer(impl, f, device, report_dir(out))
            except Exception as wexc:  # the report must still say what failed
                f.reproducer = f"(could not write a reproducer: {type(wexc).__name__}: {wexc})"
            result.failures.setdefault(v.clause, []).append(f)
        total.examples += cs.examples
        total.steps += cs.steps
        for k, n in cs.ops.items():
            total.ops[k] = total.ops.get(k, 0) + n
        for k, r in cs.worst.items():
            total.ratio(k, r)
        total.notes |= cs.notes
        total.stopped |= cs.stopped
