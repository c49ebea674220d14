"""The protocol an implementation under test follows: the implementation, its layer, what it declares.

An implementation turns a bitsandbytes base layer plus an ``AdapterSpec`` into an adapter layer
(``AdapterLayer`` below: what the reference layers have; ``conformance.impls.peft`` shows how to
wrap a library whose API differs). The implementation object needs ``name``, ``methods``,
``capabilities``, ``version()`` and ``create(base_layer, spec)``, and may have ``limitations``.

What it declares is typed once, in ``conformance.core.vocabulary``: ``methods`` is a set of
``Method`` names (``lora``, ``oft``), ``capabilities`` a set of ``Capability`` names (``4bit``, ``8bit``,
``unmerge``, ...; a method named there counts as declared, the spelling before ``methods``), and
``limitations`` maps a capability to ``{method: reason}`` for the methods it does not hold for (e.g.
``{"mixed_batch": {"oft": "..."}}``; the flat ``{"mixed_batch/oft": reason}`` is read too). The loader
refuses an unknown name as a usage error naming the valid ones; ``declared(impl)`` reads the
declaration (``Declaration``), nothing is patched onto the object. A clause, a case inside a clause,
or a stateful operation that needs what the implementation does not declare is reported ``skipped``
with the reason, never ``failed`` or ``error`` (``conformance.core.applicability`` decides).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from conformance.core import vocabulary
from conformance.core.vocabulary import Capability, Declaration, Method

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["AdapterLayer", "AdapterSpec", "Capability", "Declaration", "Implementation", "ImplementationBase",
           "ImplementationNotFound", "ImplementationUnsupported", "InvalidImplementation", "Method", "declared",
           "validate"]


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
        from conformance.quant.torchnames import dtype_of

        try:
            return dtype_of(self.dtype)
        except ValueError:
            raise ValueError(f"AdapterSpec.dtype {self.dtype!r} is not a torch dtype name (e.g. 'float32')") from None


@runtime_checkable
class AdapterLayer(Protocol):
    """The layer ``Implementation.create`` returns (an ``nn.Module``).

    Always required: ``forward(x)``, ``merge()``, ``merged``, ``merged_adapters``,
    ``get_delta_weight(name)`` (LoRA ``scaling * B @ A``; OFT the block-diagonal rotation ``R``),
    ``adapter_parameters(name)`` (the adapter's tensors under canonical names: ``lora_A.weight``
    (r x in), ``lora_B.weight`` (out x r), ``lora_B.bias``; ``oft_R.weight`` (blocks x b(b-1)/2,
    PEFT's upper-triangle layout); checks read and poison them through this), ``set_adapter(name)``,
    ``active_adapters``, ``base_layer`` (the possibly rewritten bitsandbytes layer).

    Optional, each tied to a capability (``conformance.core.vocabulary.LAYER_API``): ``unmerge()`` (``unmerge``),
    ``merge(safe_merge=True)`` (``safe_merge``), ``add_adapter``/``set_adapter(name)``/
    ``merge(adapter_names=[name])`` (``multi_adapter``: several named adapters, one active), ``set_adapter([...])``
    with several names whose deltas add up (``additive_adapters``), several merged at once (``multi_merge``),
    ``forward(x, adapter_names=[...])`` (``mixed_batch``), ``enable_adapters(bool)`` (``disable_adapters``),
    ``delete_adapter(name)`` (``delete_adapter``). A layer without the capability may leave the method out.

    ``base_layer`` is the bitsandbytes layer that holds the (possibly rewritten) quantized weight and quant state. It
    may also hold the adapter: a library whose layer subclasses the bitsandbytes layer and takes over its weight
    (AdapterHub ``adapters``' ``LoRALinear4bit``) returns that module. The checks read the weight and the quant state
    from it, take the adapter's tensors from ``adapter_parameters`` (never from the module tree), and compute the base
    output with the bitsandbytes class's own forward (``conformance.clauses.ownership``).
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

    ``methods`` (``Method`` names) and ``capabilities`` (``Capability`` names) say what it covers; an optional
    ``limitations`` maps a capability to ``{method: reason}`` (see the module docstring).
    """

    name: str
    capabilities: frozenset[str]  # and optionally ``methods`` and ``limitations``

    def version(self) -> str:
        """A version string for the report (package version, git sha, ...)."""

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        """An adapter layer (``AdapterLayer``) over ``base_layer`` with the adapter ``spec`` added and active."""


class ModelEntry(Protocol):
    """The optional model-level part of an implementation (capability ``model``; ``implementation.model``): what a
    library that attaches adapters to whole models does with them. The MODEL-* clauses ask it."""

    def attach(self, model: nn.Module, targets: list[str], spec: AdapterSpec) -> nn.Module:
        """``model`` with adapter ``spec`` on every ``nn.Linear``-like module whose name ends in one of ``targets``
        (what the user then calls: a wrapper, or the model itself with modules replaced)."""

    def adapter_layers(self, adapted: nn.Module) -> dict[str, nn.Module]:
        """The adapted modules of ``adapted``, each as an ``AdapterLayer``, by their qualified name in the base model."""

    def merge_and_unload(self, adapted: nn.Module) -> nn.Module:
        """The base model with every adapter merged into its layer and no adapter module left."""

    def save_adapter(self, adapted: nn.Module, path: str) -> None:
        """Write the adapter (its tensors and its spec) to the directory ``path``."""

    def load_adapter(self, model: nn.Module, path: str) -> nn.Module:
        """``model`` (a freshly loaded base) with the adapter saved at ``path`` attached."""

    # the model-level bookkeeping (clauses MODEL-SET-ADAPTER, MODEL-DISABLE, MODEL-DELETE-ADAPTER; each also needs
    # the layer capability of the same name: multi_adapter, disable_adapters, delete_adapter)
    def add_adapter(self, adapted: nn.Module, targets: list[str], spec: AdapterSpec) -> None:
        """A further adapter ``spec`` (a new ``adapter_name``) on the modules ``targets`` name; not made active."""

    def set_adapter(self, adapted: nn.Module, name: str) -> None:
        """Make the adapter ``name`` the one active adapter of every adapted module."""

    def disabled(self, adapted: nn.Module) -> AbstractContextManager[Any]:
        """A context in which the model runs without its adapters (enabled again on exit)."""

    def delete_adapter(self, adapted: nn.Module, name: str) -> None:
        """Remove the adapter ``name`` (its modules and tensors) from every adapted module."""

    # optional: the Trainer the library's users train with (the TRAINER-* clauses hand it the model; without this
    # method, ``transformers.Trainer``)
    def trainer_class(self) -> type:
        """A subclass of ``transformers.Trainer`` (AdapterHub ``adapters``: ``AdapterTrainer``)."""

    # capability ``prepare`` (clauses MODEL-PREPARE, MODEL-GRAD-CHECKPOINT, MODEL-FIRST-STEPS)
    def prepare(self, model: nn.Module, gradient_checkpointing: dict[str, Any] | None = None) -> nn.Module:
        """``model`` (freshly loaded, before ``attach``) made ready for training the adapters: every base parameter
        frozen, and with ``gradient_checkpointing`` (the kwargs of ``torch.utils.checkpoint``, e.g.
        ``{"use_reentrant": False}``) checkpointing on and the input embeddings' output requiring grad."""


class ImplementationBase:
    """Convenience base with the protocol's attributes (no method, no capability, no limitation)."""

    name: str = ""
    methods: frozenset[str] = frozenset()
    capabilities: frozenset[str] = frozenset()
    limitations: Mapping[str, Any] = {}

    def version(self) -> str:
        return "unknown"

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        raise NotImplementedError

    def other_methods(self) -> Mapping[str, frozenset[str]]:
        """Methods outside the suite's vocabulary that ``create`` builds by name (declaring method ``other``): name ->
        the optional operations it has (``merge``, ``unmerge``, ``safe_merge``). TWIN-CREATE holds each to "refuse or
        work"; none here."""
        return {}

    def init_unavailable(self, init: str, device: str) -> str | None:
        """Why the declared initialization ``init`` (an ``init_lora_weights`` value, ``conformance.core.inits``)
        cannot run on ``device`` here (e.g. a library that computes it on a GPU only); None when it can. The INIT-*
        clauses skip those cases with the reason."""
        return None


class ImplementationNotFound(LookupError):
    """The name does not resolve to an implementation; the message lists what does."""


class InvalidImplementation(ImplementationNotFound):
    """The object resolves but does not follow the protocol (an unknown capability or limitations key, a
    missing attribute); a usage error (exit 2) whose message names the valid values."""


class ImplementationUnsupported(RuntimeError):
    """The implementation exists but cannot run here (e.g. an unsupported PEFT version)."""


def declared(impl: Any, label: str = "") -> Declaration:
    """What ``impl`` declares (``InvalidImplementation`` for an unknown name or a malformed declaration)."""
    label = label or repr(getattr(impl, "name", impl))
    try:
        return Declaration.of(impl)
    except vocabulary.UnknownName as exc:
        raise InvalidImplementation(f"{label}: {exc}") from None
    except TypeError as exc:
        raise InvalidImplementation(f"{label}: {exc}") from None


def validate(impl: Any, label: str = "") -> Declaration:
    """Raise ``InvalidImplementation`` unless ``impl`` follows the protocol with a valid declaration; return it."""
    label = label or repr(getattr(impl, "name", impl))
    for attr in ("name", "capabilities", "create", "version"):
        if not hasattr(impl, attr):
            raise InvalidImplementation(f"{label} is not an implementation: it lacks {attr!r} "
                                        "(see conformance.clauses.interface)")
    return declared(impl, label)
