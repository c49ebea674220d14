"""The protocol an implementation under test follows: the implementation, its layer, its capabilities.

An implementation turns a bitsandbytes base layer plus an ``AdapterSpec`` into an adapter layer
(``AdapterLayer`` below: what the reference layers have; ``conformance.impls.peft`` shows how to
wrap a library whose API differs). The implementation object needs only ``name``,
``capabilities``, ``version()`` and ``create(base_layer, spec)``; the harness derives the methods
and bit widths it covers from ``capabilities`` (``methods_of`` / ``bits_of``), nothing is patched
onto the object.

Capabilities are a closed set (``CAPABILITIES``, each documented): the loader refuses an unknown one
(or an unknown ``limitations`` key) as a usage error naming the valid ones. A clause, a case inside a
clause, or a stateful operation that needs a capability the implementation lacks is reported
``skipped`` with the reason, never ``failed`` or ``error``. A capability that holds for one method
only is narrowed by an optional ``limitations`` mapping ``{"CAPABILITY/METHOD": reason}`` (e.g.
``"mixed_batch/oft"``): clauses needing it leave that method out and say so in their notes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

METHODS = ("lora", "oft")
BITS = (4, 8)

#: The closed set of capabilities, each with what declaring it promises.
CAPABILITIES: dict[str, str] = {
    # what it adapts
    "lora": "LoRA adapters (create(base, AdapterSpec(method='lora', ...)))",
    "oft": "OFT adapters (create(base, AdapterSpec(method='oft', ...)))",
    "4bit": "bnb.nn.Linear4bit bases (NF4/FP4, with and without double quant)",
    "8bit": "bnb.nn.Linear8bitLt bases",
    "cuda": "runs on CUDA devices",
    # operations
    "unmerge": "unmerge() undoes merge() (dequantize, remove the adapters, requantize)",
    "safe_merge": "merge(safe_merge=True) checks the merged weights and refuses non-finite ones",
    "multi_adapter": "several adapters on one layer: add_adapter(name, ...), set_adapter([names]), "
                     "merge(adapter_names=[...])",
    "mixed_batch": "forward(x, adapter_names=[...]) with one adapter name per sample ('__base__' = none)",
    "disable_adapters": "enable_adapters(False) / enable_adapters(True)",
    "delete_adapter": "delete_adapter(name)",
    # options
    "rslora": "LoRA with use_rslora=True (scaling lora_alpha / sqrt(r))",
    "lora_bias": "LoRA with lora_bias=True (a bias on lora_B, scaled like B's output)",
    "dropout": "LoRA lora_dropout > 0 and OFT module_dropout > 0: active in train mode (whatever the grad mode), "
               "the identity in eval mode",
    "input_cast": "the layer casts its input to the adapter dtype (AdapterSpec.dtype) before the adapter path, "
                  "so inputs of any float dtype work with float32 adapters",
    # whole models
    "peft_model": "builds whole PEFT models (transformers Trainer clauses)",
    "distributed": "layers built by create() train under torch DistributedDataParallel (adapter tensors registered "
                   "as parameters, deterministic under torch.manual_seed, implementation object picklable for "
                   "spawned ranks)",
}

#: What the layer's optional operations and parameters need (documentation and ``AdapterLayer``).
OPTIONAL: dict[str, str] = {
    "unmerge": "AdapterLayer.unmerge",
    "safe_merge": "AdapterLayer.merge(safe_merge=True)",
    "multi_adapter": "AdapterLayer.add_adapter / set_adapter([...]) / merge(adapter_names=...)",
    "mixed_batch": "AdapterLayer.forward(x, adapter_names=[...])",
    "disable_adapters": "AdapterLayer.enable_adapters",
    "delete_adapter": "AdapterLayer.delete_adapter",
    "rslora": "AdapterSpec.params['use_rslora'] = True",
    "lora_bias": "AdapterSpec.params['lora_bias'] = True",
    "dropout": "AdapterSpec.params['lora_dropout'] > 0 (LoRA) / AdapterSpec.params['module_dropout'] > 0 (OFT)",
}


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter to build: method ('lora' or 'oft'), its name, constructor parameters and dtype.

    ``dtype`` is the adapter parameters' dtype (a name such as ``"float32"``; ``torch_dtype`` gives the
    ``torch.dtype``): the checks read the adapter's tensors and compute their expectations in it, so a
    layer that does not cast its input (no ``input_cast`` capability) is checked on what it does.
    """

    method: str
    adapter_name: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"AdapterSpec.dtype {self.dtype!r} is not a torch dtype name (e.g. 'float32')")
        return dt


@runtime_checkable
class AdapterLayer(Protocol):
    """The layer ``Implementation.create`` returns (an ``nn.Module``).

    Always required: ``forward(x)``, ``merge()``, ``merged``, ``merged_adapters``,
    ``get_delta_weight(name)`` (LoRA ``scaling * B @ A``; OFT the block-diagonal rotation ``R``),
    ``adapter_parameters(name)`` (the adapter's tensors under canonical names: ``lora_A.weight``
    (r x in), ``lora_B.weight`` (out x r), ``lora_B.bias``; ``oft_R.weight`` (blocks x b(b-1)/2,
    PEFT's upper-triangle layout); checks read and poison them through this), ``set_adapter(name)``,
    ``active_adapters``, ``base_layer`` (the possibly rewritten bitsandbytes layer).

    Optional, each tied to a capability (``OPTIONAL``): ``unmerge()`` (``unmerge``),
    ``merge(safe_merge=True)`` (``safe_merge``), ``add_adapter``/``set_adapter([...])``/
    ``merge(adapter_names=...)`` (``multi_adapter``), ``forward(x, adapter_names=[...])``
    (``mixed_batch``), ``enable_adapters(bool)`` (``disable_adapters``), ``delete_adapter(name)``
    (``delete_adapter``). A layer without the capability may leave the method out.
    """

    base_layer: nn.Module
    merged_adapters: list[str]

    @property
    def merged(self) -> bool: ...

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor: ...

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None: ...

    def get_delta_weight(self, name: str) -> torch.Tensor: ...

    def adapter_parameters(self, name: str) -> Mapping[str, torch.Tensor]: ...

    def set_adapter(self, adapter_names: str | list[str]) -> None: ...


@runtime_checkable
class Implementation(Protocol):
    """What the runner needs from an implementation under test.

    ``capabilities`` is a subset of ``CAPABILITIES``; an optional ``limitations`` attribute maps
    ``"CAPABILITY/METHOD"`` to a reason (see the module docstring).
    """

    name: str
    capabilities: frozenset[str]

    def version(self) -> str:
        """A version string for the report (package version, git sha, ...)."""

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        """An adapter layer (``AdapterLayer``) over ``base_layer`` with the adapter ``spec`` added and active."""


class ImplementationBase:
    """Convenience base with the protocol's attributes (no capability, no limitation)."""

    name: str = ""
    capabilities: frozenset[str] = frozenset()
    limitations: Mapping[str, str] = {}

    def version(self) -> str:
        return "unknown"

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        raise NotImplementedError


def methods_of(impl: Any) -> frozenset[str]:
    """The adapter methods ``impl`` declares (computed by the harness from ``capabilities``)."""
    return frozenset(m for m in METHODS if m in impl.capabilities)


def bits_of(impl: Any) -> frozenset[int]:
    """The base bit widths ``impl`` declares (computed by the harness from ``capabilities``)."""
    return frozenset(b for b in BITS if f"{b}bit" in impl.capabilities)


def limitations_of(impl: Any) -> dict[str, str]:
    """``impl.limitations`` (``{"CAPABILITY/METHOD": reason}``), empty when it declares none."""
    return dict(getattr(impl, "limitations", None) or {})


class ImplementationNotFound(LookupError):
    """The name does not resolve to an implementation; the message lists what does."""


class InvalidImplementation(ImplementationNotFound):
    """The object resolves but does not follow the protocol (an unknown capability or limitations key, a
    missing attribute); a usage error (exit 2) whose message names the valid values."""


class ImplementationUnsupported(RuntimeError):
    """The implementation exists but cannot run here (e.g. an unsupported PEFT version)."""


def validate(impl: Any, label: str = "") -> None:
    """Raise ``InvalidImplementation`` unless ``impl`` follows the protocol with known capabilities/limitations."""
    label = label or repr(getattr(impl, "name", impl))
    for attr in ("name", "capabilities", "create", "version"):
        if not hasattr(impl, attr):
            raise InvalidImplementation(f"{label} is not an implementation: it lacks {attr!r} "
                                        "(see conformance.spec.interface)")
    caps = impl.capabilities
    if isinstance(caps, str) or not isinstance(caps, Iterable):
        raise InvalidImplementation(f"{label}: capabilities must be a set of names, got {type(caps).__name__}")
    unknown = sorted(c for c in caps if c not in CAPABILITIES)
    if unknown:
        raise InvalidImplementation(f"{label}: unknown capabilit{'y' if len(unknown) == 1 else 'ies'} "
                                    f"{', '.join(map(repr, unknown))}; valid: {', '.join(CAPABILITIES)}")
    lims = getattr(impl, "limitations", None) or {}
    if not isinstance(lims, Mapping):
        raise InvalidImplementation(f"{label}: limitations must be a mapping 'CAPABILITY/METHOD' -> reason")
    for key, reason in lims.items():
        cap, _, method = str(key).partition("/")
        if cap not in CAPABILITIES or method not in METHODS:
            raise InvalidImplementation(
                f"{label}: unknown limitations key {key!r}; keys are 'CAPABILITY/METHOD' with CAPABILITY one of "
                f"{', '.join(CAPABILITIES)} and METHOD one of {', '.join(METHODS)}")
        if not reason:
            raise InvalidImplementation(f"{label}: limitations[{key!r}] needs a reason")


#: id(impl) -> (impl, the string it was loaded from); filled by ``conformance.harness.loader.load``.
_TARGETS: dict[int, tuple[Any, str]] = {}


def remember_target(impl: Any, target: str) -> None:
    """Record that ``impl`` was loaded from ``target`` (the loader calls this; the object is not touched)."""
    _TARGETS[id(impl)] = (impl, target)


def target_of(impl: Any) -> str | None:
    """The string (built-in name, entry point or ``module:attr``) ``impl`` was loaded from, or None for an
    object built in this process: workers rebuild an implementation from exactly this string."""
    got = _TARGETS.get(id(impl))
    return got[1] if got is not None and got[0] is impl else None
