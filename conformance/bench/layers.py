"""Build what a :class:`~conformance.bench.cases.BenchCase` times: layers, inputs and the timed call.

What ``BenchCase.impl`` names:

- the bench's own rows, built here: ``bnb`` (the bare ``bnb.nn.Linear4bit`` / ``Linear8bitLt``), ``floor-bare`` /
  ``floor`` (the measured floors, ``conformance.bench.roofline.floor_fn``), ``reference-noclone`` (the reference
  with ``clone_base_output=False``) and ``reference-v0`` (``-noclone``: the reference LoRA with its forward as
  first written, delta tensor and ``add_``, kept here, not in the reference, to show in the same run what the
  fused forward bought);
- anything else is an implementation found by the runner's loader (``conformance.harness.loader.load``: a
  built-in name such as ``reference``, ``peft`` or ``litgpt``, an entry point, ``package.module:attr``) and built
  through its ``create`` with the adapter dtype in the ``AdapterSpec``. A library wrapper
  (``conformance.impls.library.LibraryLayer``) is unwrapped: the library's own layer is timed (PEFT's
  ``peft.tuners.lora.bnb.Linear4bit``, LitGPT's ``LoRALinear``). Merge and unmerge are timed only for an
  implementation declaring ``unmerge`` (LitGPT does not: its merge is one-way). ``NAME@PYTHON`` (another
  interpreter) is timed there: ``conformance.bench.runner.run_elsewhere``.

``CONFORMANCE_BENCH_INJECT_SLOWDOWN=0.10`` makes every ``reference*`` timed call 10% slower (a calibrated
busy-wait on the host, or ``torch.cuda._sleep`` on the GPU) -- only to show that the regression
compare fires; it never touches the reference layer itself.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec, Implementation, ImplementationUnsupported
from conformance.core.vocabulary import LORA_LIKE
from conformance.harness.loader import load
from conformance.impls.library import LibraryLayer
from conformance.impls.reference import ReferenceImplementation
from conformance.quant.torchnames import dtype_of
from conformance.reference import LoraLinear4bit, LoraLinear8bit

from . import roofline
from .cases import BenchCase
from .memory import stored_bytes
from .timing import host_clock, spin

INJECT_ENV = "CONFORMANCE_BENCH_INJECT_SLOWDOWN"

#: rows built here rather than loaded (see the module docstring)
OWN_ROWS = ("bnb", "floor-bare", "floor", "reference-v0", "reference-v0-noclone")


class _LoraV0Mixin:
    """The reference LoRA forward as first written (git 1fb742a): delta tensor, then ``add_``."""

    def forward(self, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
        self._check_input(x, adapter_names)
        if self.disable_adapters or self.merged or adapter_names is not None:
            return super().forward(x, adapter_names)
        result = self.base_layer(x)
        if self.clone_base_output:
            result = result.clone()
        for name in self.active_adapters:
            a, b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(a.weight.dtype))
            delta = torch.nn.functional.linear(torch.nn.functional.linear(h, a.weight), b.weight, b.bias)
            result.add_(delta.to(result.dtype), alpha=self.scaling[name])
        return result


class LoraV0Linear4bit(_LoraV0Mixin, LoraLinear4bit):
    pass


class LoraV0Linear8bit(_LoraV0Mixin, LoraLinear8bit):
    pass



def make_base(case: BenchCase, device: str, seed: int = 0) -> nn.Module:
    """The quantized base layer of a case: NF4 (+ double quant) or int8, no bias, weight in the compute dtype."""
    dtype = dtype_of(case.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(case.out_features, case.in_features, generator=gen, device=device, dtype=dtype)
    w.mul_(case.in_features ** -0.5)
    if case.bits == 8:
        w = w.cpu()  # bnb's Int8Params quantizes only on a move from the CPU
    return case.base.build(device, weight=w)


def implementation(name: str) -> Implementation:
    """The implementation a case names: ``reference-noclone`` is the reference without its defensive clone, any
    other name goes to the runner's loader (``ImplementationNotFound`` names what is known)."""
    if name == "reference-noclone":
        return ReferenceImplementation(clone_base_output=False)
    return load(name)


def _adapter_tensors(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trainable tensors of a reference or library layer (canonical names)."""
    if hasattr(layer, "adapter_parameters"):
        return layer.adapter_parameters("default")
    out = {}
    for name, p in layer.named_parameters():
        if p.requires_grad:
            out[name] = p
    return out


def _is_magnitude(name: str) -> bool:
    """DoRA's magnitude vector (reference ``lora_magnitude_vector.weight``, PEFT
    ``lora_magnitude_vector.default.weight``)."""
    return "lora_magnitude_vector" in name.split(".")


def make_adapter_layer(case: BenchCase, base: nn.Module, seed: int = 1, impl: Implementation | None = None,
                       unwrap: bool = True) -> nn.Module:
    """The adapter layer of a case over ``base``, random adapter tensors (never time on zeros); ``unwrap``: a library's
    own layer instead of its protocol wrapper (forwards; a timed merge calls the protocol's ``merge``/``unmerge``).

    LoRA and DoRA adapters are held in the compute dtype; OFT's rotation parameters stay float32 (the Cayley solve
    needs it). A DoRA magnitude keeps the layer's own initial value (the row norms of ``W0 + s B A`` at its initial
    factors: positive, as trained magnitudes are). ``impl``: the loaded implementation (default:
    ``implementation(case.impl)``)."""
    dtype = dtype_of(case.dtype)
    gen = torch.Generator(device=base.weight.device).manual_seed(seed)
    params = dict(case.adapter.params)
    adapter_dtype = case.dtype if case.method in LORA_LIKE else "float32"
    if case.impl.startswith("reference-v0"):
        if case.method != "lora":
            raise ValueError(f"{case.impl} is a LoRA forward: it has no {case.method}")
        cls = LoraV0Linear4bit if case.bits == 4 else LoraV0Linear8bit
        layer = cls(base, "default", clone_base_output=not case.impl.endswith("-noclone"), **params)
        for mod in (layer.lora_A, layer.lora_B):
            mod.to(dtype)
    else:
        impl = impl or implementation(case.impl)
        layer = impl.create(base, AdapterSpec(case.method, "default", params, adapter_dtype))
        if unwrap and isinstance(layer, LibraryLayer):  # time the library's own layer, not the protocol wrapper
            layer = layer.layer
    with torch.no_grad():
        for name, p in _adapter_tensors(layer).items():
            if not _is_magnitude(name):
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * 0.02)
    return layer


def lora_tensors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scaling) of a LoRA layer, for the measured floor."""
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), float(
        layer.scaling["default"])


def magnitude_tensor(layer: nn.Module) -> torch.Tensor:
    """The magnitude vector of a DoRA layer (reference or PEFT), for the measured floor."""
    return layer.lora_magnitude_vector["default"].weight.detach()


@dataclass
class Prepared:
    """A case ready to time: ``fn`` is the timed call, ``setup`` runs untimed before each round."""

    case: BenchCase
    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    static_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _param_bytes(layer: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters() if p.dtype.is_floating_point)


class Builder:
    """Builds (and caches) base layers and adapter layers while the runner walks the matrix."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._base_key: tuple | None = None
        self._base: nn.Module | None = None
        self._layers: dict[str, nn.Module] = {}
        self._lora_for_floor: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._magnitude_for_floor: torch.Tensor | None = None
        self._impls: dict[str, Implementation] = {}

    def implementation(self, name: str) -> Implementation | None:
        """The loaded implementation ``name`` names (loaded once per builder); None for the bench's own rows."""
        if name in OWN_ROWS:
            return None
        if name not in self._impls:
            self._impls[name] = implementation(name)
        return self._impls[name]

    def base(self, case: BenchCase) -> nn.Module:
        key = (case.method, case.bits, case.quant_type, case.double_quant, case.in_features, case.out_features,
               case.dtype)
        if key != self._base_key:
            self._base = self._layers = None
            self._lora_for_floor = self._magnitude_for_floor = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self._base = make_base(case, self.device)
            self._base_key = key
            self._layers = {}
        return self._base

    def discard(self) -> None:
        """Forget the cached base and layers: the next case builds its own. After a failed case, whose
        implementation may have left the shared base broken (PEFT 0.21.2's DoRA re-wraps an 8-bit weight on the CPU
        without its ``SCB``, docs/findings.md, PEFT 15), so that its failure stays its own."""
        self._base_key = self._base = None
        self._layers = {}
        self._lora_for_floor = self._magnitude_for_floor = None

    def layer(self, case: BenchCase) -> nn.Module:
        base = self.base(case)
        if case.impl == "bnb":
            return base
        if case.impl not in self._layers:
            self._layers[case.impl] = make_adapter_layer(case, base, impl=self.implementation(case.impl))
        return self._layers[case.impl]

    def floor_lora(self, case: BenchCase) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self._lora_for_floor is None:
            self._lora_for_floor = lora_tensors(self.layer(case.with_impl("reference")))
        return self._lora_for_floor

    def floor_magnitude(self, case: BenchCase) -> torch.Tensor | None:
        """The reference layer's DoRA magnitude for the measured floor of a DoRA case; None for other methods."""
        if case.method != "dora":
            return None
        if self._magnitude_for_floor is None:
            self._magnitude_for_floor = magnitude_tensor(self.layer(case.with_impl("reference")))
        return self._magnitude_for_floor

    def prepare(self, case: BenchCase) -> Prepared:
        dev, dtype = self.device, dtype_of(case.dtype)
        if case.op in ("merge", "unmerge"):
            return self._prepare_merge(case)
        base = self.base(case)
        gen = torch.Generator(device=dev).manual_seed(2)
        x = torch.randn(case.tokens, case.in_features, generator=gen, device=dev, dtype=dtype)
        grad = torch.randn(case.tokens, case.out_features, generator=gen, device=dev, dtype=dtype) \
            if case.op == "fwdbwd" else None
        static = sum(stored_bytes(base).values())
        if case.impl in ("floor", "floor-bare"):
            lora = self.floor_lora(case) if case.impl == "floor" else None
            magnitude = self.floor_magnitude(case) if case.impl == "floor" else None
            fn = roofline.floor_fn(case, base, x, grad, lora, magnitude)
            return Prepared(case, fn, None, static)
        layer = self.layer(case)
        static += _param_bytes(layer) - _param_bytes(base) if layer is not base else 0
        if case.op == "fwd":
            def fwd() -> torch.Tensor:
                with torch.no_grad():
                    return layer(x)
            return Prepared(case, fwd, None, static)
        x.requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]

        def setup() -> None:
            x.grad = None
            for p in params:
                p.grad = None

        def fwdbwd() -> torch.Tensor:
            out = layer(x)
            out.backward(grad)
            return out

        return Prepared(case, fwdbwd, setup, static)

    def _prepare_merge(self, case: BenchCase) -> Prepared:
        impl = self.implementation(case.impl)
        if impl is not None and "unmerge" not in impl.capabilities:
            raise ImplementationUnsupported(f"{case.impl} is benchmarked for fwd/fwdbwd only: it declares no unmerge "
                                            "(a timed merge round unmerges before each merge)")
        # merge mutates the base: a private copy, so the shared base of the run cases stays pristine
        base = copy.deepcopy(self.base(case))
        layer = make_adapter_layer(case, base, impl=impl, unwrap=False)
        static = sum(stored_bytes(base).values()) + _param_bytes(layer) - _param_bytes(base)
        if case.op == "merge":
            def setup() -> None:
                if layer.merged:
                    layer.unmerge()

            fn = layer.merge
        else:
            def setup() -> None:
                if not layer.merged:
                    layer.merge()

            fn = layer.unmerge
        return Prepared(case, fn, setup, static)


def inject_factor() -> float:
    """The slowdown factor asked for through $CONFORMANCE_BENCH_INJECT_SLOWDOWN (0 when unset)."""
    raw = os.environ.get(INJECT_ENV, "").strip()
    if not raw:
        return 0.0
    value = float(raw)
    if not 0 <= value < 10:
        raise ValueError(f"${INJECT_ENV} must be a fraction such as 0.10, got {raw!r}")
    return value


def _cuda_sleep_rate() -> float:
    """Cycles per second of ``torch.cuda._sleep`` (measured once)."""
    cycles = 2_000_000
    torch.cuda._sleep(cycles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def with_slowdown(prep: Prepared, factor: float, device: str) -> Prepared:
    """Wrap ``prep.fn`` so that it takes ``1 + factor`` times as long (calibrated on the spot)."""
    if factor <= 0 or not prep.case.impl.startswith("reference"):
        return prep
    clock = time.perf_counter if device == "cuda" else host_clock()  # the clock the CPU timings use
    samples = []
    for _ in range(9):
        if prep.setup:
            prep.setup()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        prep.fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(clock() - t0)
    delay = factor * statistics.median(samples)
    inner = prep.fn
    if device == "cuda":
        cycles = int(delay * _cuda_sleep_rate())

        def slowed() -> Any:
            out = inner()
            torch.cuda._sleep(cycles)
            return out
    else:
        def slowed() -> Any:
            out = inner()
            spin(delay, clock)
            return out

    prep.notes.append(f"injected slowdown {factor:.0%} ({delay * 1e6:.1f} us)")
    return Prepared(prep.case, slowed, prep.setup, prep.static_bytes, prep.notes)
