"""The driver: one adapter layer beside the float64 model of its logical state (plain Python, no hypothesis).

A :class:`Driver` builds the layer through the implementation protocol (``impl.create(base,
AdapterSpec(...))``) and a :class:`~.model.LogicalModel`; the ops (:mod:`.ops`) run steps on both.
:meth:`Driver.check_invariants` is the one check every step must pass (merged flags, base layer
unchanged, adapters preserved); steps whose result the model predicts add their own checks
(``check_output``, ``after_requant``, ``after_unmerge_all``). A broken invariant raises the
:class:`~.config.Violation` of its clause, recorded in :class:`~.config.Stats`.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from conformance import numerics
from conformance.clauses.cases import DORA_MAGNITUDE as MAGNITUDE
from conformance.clauses.cases import trained_magnitude
from conformance.clauses.interface import AdapterSpec, Implementation, declared
from conformance.clauses.stateful.declare import ADAPTERS, BASE, DRIFT, FLAGS, MERGE, OUTPUT, UNMERGE, VALID
from conformance.core.vocabulary import Capability, capability
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_of

from .config import (
    PACKED_TRAIN_GRAD,
    MachineConfig,
    Stats,
    StepNotApplicable,
    UpstreamFailure,
    Violation,
    seed_for,
    step_kind,
    variant_ok,
    variants,
    violation_type,
)
from .model import AdapterModel, LogicalModel, _ratio, copy_tensors

#: ops after which the base weights legitimately changed (their own checks bound the change)
BASE_CHANGING = ("merge", "unmerge")


def _is_cuda_fault(exc: BaseException) -> bool:
    """A CUDA error that poisons the context (illegal memory access, launch failure, ...)."""
    text = f"{type(exc).__name__}: {exc}"
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in text


_BNB_DIR = os.path.dirname(os.path.abspath(bnb.__file__)) + os.sep


def _raised_in_bitsandbytes(tb: traceback.StackSummary) -> bool:
    """Whether an exception went through bitsandbytes' own code (a frame of its package in the traceback: the
    innermost Python frame may be torch's op dispatch or autograd below it)."""
    return any(os.path.abspath(frame.filename).startswith(_BNB_DIR) for frame in tb)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return "n/a (shapes differ)"
    return f"{float((a.double() - b.double()).abs().max()):.3g}" if a.numel() else "0"


class Driver:
    """One layer plus its float64 model; :mod:`.ops` runs the steps, this checks them."""

    def __init__(self, impl: Implementation, config: MachineConfig, device: str = "cpu",
                 stats: Stats | None = None, verbose: Callable[[str], None] | None = None,
                 exclude_invalid: Sequence[str] = ()) -> None:
        from .ops import render_step

        self.impl = impl
        self.config = config
        self.device = device
        self.quant_device = device  # where the example's base layer was quantized
        self.stats = stats if stats is not None else Stats()
        self.stats.tick()
        self.stats.start_example()
        self.verbose = verbose
        self.trace: list[dict[str, Any]] = []
        self.recording = True
        self.declaration = declared(impl)
        self.caps = self.declaration.capabilities
        self.exclude_invalid = frozenset(exclude_invalid)
        self.method = config.method
        #: CPU<->CUDA moves: only in a machine run for CUDA (a CPU run on a GPU host never touches CUDA)
        self.moves = str(device).startswith("cuda") and torch.cuda.is_available() and self.has("cuda")
        self._checked_at = -1
        #: a base with the example's settings in bitsandbytes' standard layout (built when a packed base needs it)
        self._standard: nn.Module | None = None
        self.trace.append({"op": "create", **config.to_dict()})
        if verbose:
            verbose(render_step(self.trace[-1]))
        if not variant_ok(self.method, config.variant, self.caps, config.bias):
            raise StepNotApplicable(f"variant {config.variant} ({variants(self.method)[config.variant]}) needs a "
                                    f"capability {impl.name} does not declare (or a base bias)")
        params = dict(variants(self.method)[config.variant])
        base = self.fresh_base()
        #: the quantization settings of the base as created, before the implementation sees it: every
        #: requantization (merge, unmerge) must keep exactly these (recorded here, not at the first merge,
        #: so a first merge that changes them is not compared with itself)
        self._settings: dict[str, Any] = qlayers.quant_settings(base)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seed_for(device, config.seed)
                self.layer = impl.create(base, AdapterSpec(self.method, "a0", params))
        except Exception as exc:
            self.fail(VALID, f"impl.create(base, AdapterSpec({self.method!r}, 'a0', {params})) raised "
                             f"{type(exc).__name__}: {exc}")
        self.move_magnitude("a0", config.seed)
        self.model = LogicalModel.from_base(self.layer.base_layer)
        self.model.adapters["a0"] = AdapterModel(self.method, params, self.read("a0"))
        self.model.active = ["a0"]
        self.snap = qlayers.snapshot(self.layer.base_layer)
        if qlayers.quant_settings(self.layer.base_layer) != self._settings:
            self.fail(BASE, f"impl.create changed the base layer's quantization settings: {self._settings} -> "
                            f"{qlayers.quant_settings(self.layer.base_layer)}")
        self.counter = 1
        self.check_invariants()

    # -- state the ops consult ----------------------------------------------------------------
    @property
    def op(self) -> str:
        """The op of the step being run (``create`` before the first)."""
        return self.trace[-1]["op"]

    @property
    def merged(self) -> bool:
        return bool(self.model.merged)

    @property
    def names(self) -> list[str]:
        return list(self.model.adapters)

    def has(self, name: str) -> bool:
        return capability(name) in self.caps

    def mixed_ok(self) -> bool:
        return self.declaration.has(Capability.MIXED_BATCH, self.method)

    def fresh_base(self) -> nn.Module:
        """A base layer as the example's first one: quantized on the device the example started on.

        After a CPU<->CUDA move the layer lives elsewhere, but a fresh base quantized there would not
        be the same weights (bitsandbytes 0.50.2's CPU and CUDA ``quantize_4bit`` with double quant
        give different bytes for the same float weight), so it is quantized where the original was
        and then moved.
        """
        c = self.config
        base = c.base.build(self.quant_device, seed=c.seed)
        return qlayers.move_base_layer(base, self.device)

    def input(self, lead: Sequence[int], dtype: str, seed: int, in_features: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, in_features or self.config.in_features, generator=g)
        return x.to(device=self.device, dtype=dtype_of(dtype))

    def move_magnitude(self, name: str, seed: int) -> None:
        """DoRA: move adapter ``name``'s magnitude off its initial value, as training would (``cases.trained_magnitude``,
        each entry times a factor drawn from ``seed``). A fresh DoRA adapter has ``m = ||W0 + s B A||_c``: its factor
        ``m/n`` is 1 up to rounding, so a forward or merge that left the magnitude or the norm out would match the
        model (LoRA's output) and go unseen. Rendered with the step that adds the adapter (``ops.render_step``)."""
        if self.method != "dora":
            return
        if MAGNITUDE not in self.layer.adapter_parameters(name):
            self.fail(ADAPTERS, f"DoRA adapter {name!r} has no {MAGNITUDE!r} among its adapter_parameters "
                                f"({sorted(self.layer.adapter_parameters(name))})")
        trained_magnitude(self.layer, name, torch.Generator().manual_seed(seed))

    def read(self, name: str) -> dict[str, torch.Tensor]:
        return copy_tensors(self.layer.adapter_parameters(name))

    def layer_names(self) -> list[str]:
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

    @property
    def snap(self) -> qlayers.LayerSnapshot:
        """The base layer's bytes as last seen (or adopted); ``snap_packed``: whether it was in bitsandbytes' CPU
        packed layout then."""
        return self._snap

    @snap.setter
    def snap(self, value: qlayers.LayerSnapshot) -> None:
        self._snap = value
        self.snap_packed = qlayers.is_cpu_packed(self.layer.base_layer)

    def standard_base(self) -> nn.Module:
        """A base with the example's quantization settings in bitsandbytes' standard layout (never run): what a
        bound needs from the settings of a requantization that a repack in the same forward hid."""
        if self._standard is None:
            self._standard = self.fresh_base()
        return self._standard

    @property
    def settings(self) -> dict[str, Any]:
        """The base layer's quantization settings as created (every requantization keeps them)."""
        return self._settings

    # -- recording and failing --------------------------------------------------------------
    def record(self, step: dict[str, Any]) -> None:
        from .ops import render_step

        self.trace.append(step)
        self.stats.op(step["op"])
        if self.config.base.cpu_packed and qlayers.is_cpu_packed(self.layer.base_layer):
            self.stats.steps_on_packed_layout += 1
        if self.verbose:
            self.verbose(render_step(step))

    def fail(self, clause: str, message: str) -> None:
        from .ops import render_step

        v = violation_type(clause, step_kind(self.trace[-1]))(f"[{self.config.label}, step {len(self.trace) - 1}: {render_step(self.trace[-1])}] "
                               f"{message}", self.trace, self.config.to_dict())
        if self.recording:
            self.stats.record(v)
        raise v

    def met_upstream(self, clause: str, situation: str, message: str) -> None:
        """End the step as a listed bitsandbytes failure (:class:`~.config.UpstreamFailure`), counted in
        ``Stats.upstream``; the example goes on with a fresh layer."""
        from .ops import render_step

        f = UpstreamFailure(clause, situation, f"[{self.config.label}, step {len(self.trace) - 1}: "
                                               f"{render_step(self.trace[-1])}] {message}", self.trace,
                            self.config.to_dict())
        self.stats.met_upstream(f)
        raise f

    def grad_forward(self) -> bool:
        """Whether the step being run is a forward with grad enabled (a training step, a forward under grad)."""
        step = self.trace[-1]
        return step["op"] == "train_step" or (step["op"] == "forward" and step.get("grad_mode") == "grad")

    def bounded(self, clause: str, ratio: float, message: Callable[[], str]) -> None:
        """Record ``ratio`` (observed / analytic bound) for ``clause``; a violation unless it is <= 1 (NaN fails).

        ``message`` is built only on failure (``Expected.describe`` scans the whole output)."""
        self.stats.reach(clause, self.op)
        self.stats.ratio(clause, ratio)
        if not ratio <= 1.0:
            self.fail(clause, f"{message()} (ratio {ratio:.3g})")

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a valid step's call on the layer; any exception is a STATE-VALID-NEVER-RAISES violation."""
        self.stats.reach(VALID, self.op)
        packed = self.config.base.cpu_packed and qlayers.is_cpu_packed(self.layer.base_layer)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn()
            if torch.cuda.is_available() and (str(self.device).startswith("cuda") or self.op == "device_move"):
                # CUDA reports a kernel's fault at the next synchronisation: wait here so a fault is
                # attributed to the step that caused it, in every replay alike (hypothesis needs the
                # same choices to end the same way)
                torch.cuda.synchronize()
            return out
        except Violation:
            raise
        except Exception as exc:
            from .ops import render_step

            tb = traceback.extract_tb(exc.__traceback__)
            where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
            if _is_cuda_fault(exc):
                self.stats.cuda_fault = f"valid step {what} ({render_step(self.trace[-1])}) raised {exc}"
            if packed and self.grad_forward() and _raised_in_bitsandbytes(tb):
                # bitsandbytes 0.50.2 autograd/_functions.py matmul_4bit: once repacked, a forward whose input
                # requires grad raises in the packed CPU branch (an OFT layer's rotated input does); the check
                # reports it as the listed failure when the list covers this bitsandbytes (checks.report)
                self.met_upstream(VALID, PACKED_TRAIN_GRAD,
                                  f"valid step {what} on a base in bitsandbytes' CPU packed layout raised inside "
                                  f"bitsandbytes {type(exc).__name__}: {exc}{where}")
            self.fail(VALID, f"valid step {what} raised {type(exc).__name__}: {exc}{where}")

    # -- the invariants ---------------------------------------------------------------------
    def check_invariants(self, where: str = "") -> None:
        """What every step keeps: merged flags, the base layer (after a step that is not a merge/unmerge)
        and the adapters. Runs once per step (a repeated call after the same step returns at once)."""
        if self._checked_at == len(self.trace):
            return
        self.check_flags(where)
        if self.op not in BASE_CHANGING:
            self.check_base(where)
        self.check_adapters(where)
        self._checked_at = len(self.trace)

    def check_flags(self, where: str = "") -> None:
        self.stats.reach(FLAGS, self.op)
        got = list(self.layer.merged_adapters)
        if got != self.model.merged or bool(self.layer.merged) != bool(self.model.merged):
            self.fail(FLAGS, f"{where}merged={self.layer.merged!r}, merged_adapters={got}; the sequence merged "
                             f"{self.model.merged} (merged={bool(self.model.merged)})")

    def check_adapters(self, where: str = "") -> None:
        self.stats.reach(ADAPTERS, self.op)
        names = sorted(self.layer_names())
        if names != sorted(self.model.adapters):
            self.fail(ADAPTERS, f"{where}layer has adapters {names}, the sequence made {sorted(self.model.adapters)}")
        active = list(self.layer.active_adapters)
        if active != self.model.active:
            self.fail(ADAPTERS, f"{where}active_adapters={active}, the sequence set {self.model.active}")
        if self.has("disable_adapters") and bool(self.layer.disable_adapters) != self.model.disabled:
            self.fail(ADAPTERS, f"{where}disable_adapters={self.layer.disable_adapters}, expected "
                                f"{self.model.disabled}")
        for name, ad in self.model.adapters.items():
            got = self.layer.adapter_parameters(name)
            if set(got) != set(ad.tensors):
                self.fail(ADAPTERS, f"{where}adapter {name!r} has tensors {sorted(got)}, expected {sorted(ad.tensors)}")
            for k, t in ad.tensors.items():
                g = got[k].detach().cpu()
                if not (g.shape == t.shape and g.dtype == t.dtype and g.equal(t)):
                    self.fail(ADAPTERS, f"{where}adapter {name!r} tensor {k} changed ({g.dtype} {tuple(g.shape)}, "
                                        f"expected {t.dtype} {tuple(t.shape)}, max |diff| "
                                        f"{_maxdiff(g, t)}) although no step should have changed it")

    def check_base(self, where: str = "") -> None:
        self.stats.reach(BASE, self.op)
        base = self.layer.base_layer
        if not self.snap_packed and self.config.base.cpu_packed and qlayers.is_cpu_packed(base):
            self.follow_repack(where)
        try:
            snap = qlayers.snapshot(base)
        except Exception as exc:
            self.fail(BASE, f"{where}the base layer is no longer a quantized bnb layer: {exc}")
        diff = self.snap.differences(snap)
        if self.config.bits == 8 and "bias" in diff:
            # Linear8bitLt.forward re-types its bias in place (see ops.INPUT_DTYPES_8BIT); the values are
            # compared below, through base_weights
            diff.remove("bias")
        if diff:
            self.fail(BASE, f"{where}the base layer's packed bytes / quant state changed ({', '.join(diff)}) "
                            "although no merge or unmerge happened")
        w, b = numerics.base_weights(base)
        if not w.equal(self.model.w):
            self.fail(BASE, f"{where}dequantize() of the base layer gives other weights than before "
                            f"(max |diff| {float((w - self.model.w).abs().max()):.3g})")
        if (b is None) != (self.model.b is None) or (b is not None and not b.equal(self.model.b)):
            diff = "n/a" if b is None or self.model.b is None else f"{float((b - self.model.b).abs().max()):.3g}"
            self.fail(BASE, f"{where}the base bias changed (max |diff| {diff})")

    def follow_repack(self, where: str = "") -> None:
        """bitsandbytes repacked the base in a forward of this step (``Linear4bit.forward`` on a CPU with
        AVX512-BF16: ``functional._convert_weight_packed_for_cpu``, bitsandbytes 0.50.2): the 4-bit codes are kept
        and the absmax is rounded to bfloat16, which is bitsandbytes', not the adapter layer's, doing. Checked
        (STATE-BASE-UNCHANGED-WITHOUT-MERGE) as exactly that: the codes read back in the standard layout
        (``quant.layers.standard_layout``) are the bytes seen before, and the dequantized weights moved by at
        most the absmax rounding (``quant.bounds.cpu_repack_bound``). The model then follows, as it follows the 8-bit
        bias cast (:meth:`bnb8_bias_cast`): its weights are the repacked ones and the anchor/orig chains widen by
        the repack's bound."""
        base = self.layer.base_layer
        self.stats.repacks += 1
        data, _ = qlayers.standard_layout(base)
        codes = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        before = self.snap.tensors["weight"]
        if not (codes.shape == before.shape and codes.equal(before)):
            self.fail(BASE, f"{where}the base layer's 4-bit codes changed in a step that merged nothing (read back "
                            "from bitsandbytes' CPU packed layout, which keeps them)")
        w = numerics.base_weights(base)[0]
        e = qbounds.cpu_repack_bound(base)
        r, at = _ratio(w, self.model.w, e, "weight", None, None, None)
        self.bounded(BASE, r, lambda: (f"{where}the base layer's weights moved by more than bitsandbytes' CPU "
                                       f"repack rounds them (absmax to bfloat16): {at}"))
        for ch in (self.model.anchor, self.model.orig):
            if ch is not None:
                ch.ew = ch.ew + e
        self.model.w = w
        self.snap = qlayers.snapshot(base)
        self.stats.notes.add("4-bit: a forward repacked the base into bitsandbytes' CPU packed layout (bitsandbytes)")

    # -- what the model predicts ------------------------------------------------------------
    def check_output(self, y: Any, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> None:
        if not isinstance(y, torch.Tensor):
            self.fail(OUTPUT, f"forward returned {type(y).__name__}, not a tensor")
        if tuple(y.shape) != (*x.shape[:-1], self.config.out_features):
            self.fail(OUTPUT, f"output shape {tuple(y.shape)}, expected {(*x.shape[:-1], self.config.out_features)}")
        if y.dtype != x.dtype:
            self.fail(OUTPUT, f"output dtype {y.dtype} for a {x.dtype} input")
        base = self.layer.base_layer
        training = None
        if self.config.base.cpu_packed and not qlayers.is_cpu_packed(base) and qlayers.repacks_on_eval(base):
            # the forward just run left the base in the standard layout, so it ran the standard kernel (an
            # eval-mode forward whose base input needed grad does not repack); for a 4-bit base ``training``
            # only decides whether ``linear_expected`` models the packed kernel (``quant.layers.forward_is_packed``)
            training = True
        exp = self.model.expected(base, x, adapter_names, training=training)
        self.bounded(OUTPUT, exp.ratio(y), lambda: (
            f"output differs from the float64 model beyond the analytic bound: {exp.describe(y)}; state: "
            f"active={self.model.active}, merged={self.model.merged}, disabled={self.model.disabled}, "
            f"training={self.model.training}, requantizations={self.model.requantizations}"))

    def bias_dtype(self) -> torch.dtype | None:
        """The dtype the base layer stores its bias in now (an 8-bit layer's changes with its forwards)."""
        bias = getattr(self.layer.base_layer, "bias", None)
        return None if bias is None else bias.dtype

    def after_requant(self, names: Sequence[str], sign: int, what: str, bias_before: torch.dtype | None = None,
                      bias_cast: torch.dtype | None = None) -> None:
        """Check one merge/unmerge call that requantized once per name, then adopt the stored weights.

        ``bias_before``: the bias dtype before the call. A merge/unmerge call may round the new bias to it or
        to the dtype it stores afterwards. ``bias_cast``: the call was the unmerge a forward performs before
        bitsandbytes' 8-bit forward re-types the bias to the input dtype (:meth:`forward_unmerge`)."""
        base = self.layer.base_layer
        try:
            w_act, b_act = numerics.base_weights(base)
        except Exception as exc:
            self.fail(MERGE, f"after {what} the base layer cannot be dequantized: {exc}")
        if qlayers.quant_settings(base) != self.settings:
            self.fail(MERGE, f"{what} changed the quantization settings: {self.settings} -> {qlayers.quant_settings(base)}")
        after = self.bias_dtype()
        if bias_cast is None:
            dtypes = tuple(dt for dt in (bias_before, after) if dt is not None)
        else:
            # written before the cast, in the dtype the bias had (the reference) or in float32 (PEFT promotes a
            # float16 bias when it adds the float32 lora_B.bias), then rounded to the input dtype (modelled exactly)
            dtypes = tuple(dt for dt in (bias_before, torch.float32) if dt is not None)
        # a forward that unmerged may have repacked the base afterwards (its eval-mode base forward): the
        # requantization's own state is hidden then, its bound is taken from the exact weights (model.run_ops)
        standard = self.standard_base() if qlayers.is_cpu_packed(base) else None
        chains = self.model.run_ops(names, sign, base, dtypes, bias_cast, standard)
        r, where = chains["step"].ratio(w_act, b_act)
        self.bounded(MERGE, r, lambda: (
            f"{what} of {list(names)}: stored weights are not dequantize -> {'apply' if sign > 0 else 'remove'} "
            f"-> requantize of the previous weights within the bound: {where}"))
        r, where = chains["orig"].ratio(w_act, b_act)
        self.bounded(DRIFT, r, lambda: (
            f"after {self.model.requantizations} requantizations the stored weights drifted from the original "
            f"weights (with the merged adapters applied exactly) beyond the sum of the per-requantization bounds: "
            f"{where}"))
        self.model.w, self.model.b = w_act, b_act
        self.snap = qlayers.snapshot(base)

    def after_unmerge_all(self) -> None:
        """The merged stack is empty again: weights back at the pre-merge ones (STATE-UNMERGE-RESTORES)."""
        ch = self.model.anchor
        # |stored - pre-merge| <= bound + |exact chain - pre-merge| (float64 residue of the exact model)
        ew = ch.ew + (ch.w - self.model.anchor_w).abs()
        eb = None if ch.eb is None else ch.eb + (ch.b - self.model.anchor_b).abs()
        r, where = _ratio(self.model.w, self.model.anchor_w, ew, "weight", self.model.b, self.model.anchor_b, eb)
        self.bounded(UNMERGE, r, lambda: f"unmerge did not restore the pre-merge weights within the bound: {where}")
        self.model.reset_chains()

    def pending_unmerge_on_forward(self) -> bool:
        """A forward with adapters disabled unmerges first (PEFT ``BaseTunerLayer``; the reference alike)."""
        return self.model.disabled and self.merged

    def forward_unmerge(self, x_dtype: torch.dtype, bias_before: torch.dtype | None) -> None:
        """The unmerge a forward of an ``x_dtype`` input performed (adapters disabled while merged).

        On an 8-bit base, bitsandbytes' forward then re-types the bias to ``x_dtype`` in place
        (``Linear8bitLt.forward``, bitsandbytes/nn/modules.py): the stored bias seen afterwards is the
        unmerged bias rounded to ``x_dtype``, and the model rounds its chains the same way
        (:func:`.model.cast_chain`) before comparing."""
        names = list(reversed(self.model.merged))
        self.model.merged = []
        cast = x_dtype if self.config.bits == 8 else None
        self.after_requant(names, -1, "the unmerge a disabled forward performs", bias_before, cast)
        self.after_unmerge_all()

    def bnb8_bias_cast(self, dtype: torch.dtype) -> None:
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
