"""The protocol an implementation under test follows, and how one is found by name.

An implementation turns a bitsandbytes base layer plus an ``AdapterSpec`` into an adapter layer.
The layer it returns is an ``nn.Module`` with this interface (what the reference layers have;
``conformance.impls.peft`` shows how to wrap a library whose API differs):

- ``forward(x, adapter_names=None)``: ``adapter_names`` is a per-sample list for mixed batches,
  ``"__base__"`` meaning no adapter;
- ``merge(safe_merge=False, adapter_names=None)``, ``unmerge()``, ``merged``, ``merged_adapters``;
- ``get_delta_weight(name)``: LoRA ``scaling * B @ A``; OFT the block-diagonal rotation ``R``;
- ``add_adapter(name, **params)``, ``set_adapter(name_or_names)``, ``active_adapters``;
- ``adapter_parameters(name)``: the adapter's tensors under canonical names
  (``lora_A.weight`` (r x in), ``lora_B.weight`` (out x r), ``lora_B.bias``; ``oft_R.weight``
  (blocks x b(b-1)/2, PEFT's upper-triangle layout)); checks read and poison them through this;
- ``base_layer``: the (possibly rewritten) bitsandbytes layer;
- optional, declared as capabilities: ``enable_adapters(bool)``, ``delete_adapter(name)``.

Optional capabilities are declared in ``Implementation.capabilities``; a clause that needs one the
implementation lacks is reported ``skipped`` with the reason, never ``failed``. A capability that holds
for one method only is narrowed by an optional ``limitations`` mapping, ``{"CAPABILITY/METHOD": reason}``
(e.g. ``"mixed_batch/oft"``): clauses needing it leave that method out and say so in their notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

CAPABILITIES = {
    "lora": "LoRA adapters",
    "oft": "OFT adapters",
    "4bit": "bnb.nn.Linear4bit bases (NF4/FP4)",
    "8bit": "bnb.nn.Linear8bitLt bases",
    "multi_adapter": "several adapters on one layer (add_adapter, set_adapter with a list)",
    "mixed_batch": "forward(x, adapter_names=[...]) with one adapter per sample",
    "lora_bias": "LoRA with lora_bias=True",
    "disable_adapters": "enable_adapters(False) / enable_adapters(True)",
    "delete_adapter": "delete_adapter(name)",
    "cuda": "runs on CUDA devices",
    "peft_model": "builds whole PEFT models (transformers Trainer clauses)",
}


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter to build: method ('lora' or 'oft'), its name and constructor parameters."""

    method: str
    adapter_name: str = "default"
    params: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Implementation(Protocol):
    """What the runner needs from an implementation under test."""

    name: str
    capabilities: frozenset[str]

    def version(self) -> str:
        """A version string for the report (package version, git sha, ...)."""

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        """An adapter layer over ``base_layer`` with the adapter ``spec`` added and active."""

    def methods(self) -> frozenset[str]:
        ...

    def bits(self) -> frozenset[int]:
        ...


class ImplementationBase:
    """Convenience base: derives ``methods()``/``bits()`` from ``capabilities``."""

    name: str = ""
    capabilities: frozenset[str] = frozenset()

    def version(self) -> str:
        return "unknown"

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        raise NotImplementedError

    def methods(self) -> frozenset[str]:
        return frozenset(m for m in ("lora", "oft") if m in self.capabilities)

    def bits(self) -> frozenset[int]:
        return frozenset(b for b in (4, 8) if f"{b}bit" in self.capabilities)


class ImplementationNotFound(LookupError):
    """The name does not resolve to an implementation; the message lists what does."""


class ImplementationUnsupported(RuntimeError):
    """The implementation exists but cannot run here (e.g. an unsupported PEFT version)."""
