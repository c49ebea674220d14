"""What the wrappers of installed third-party libraries share: a version-aware API object decides everything.

A wrapper (``conformance.impls.peft``, ``conformance.impls.litgpt``) keeps the library's API detection in one
``*Api`` class (version, the capabilities it really has, why the others are missing, per-method limitations,
``build(base, spec)``); this base class only exposes it through the implementation protocol, so no wrapper can
declare a capability its API object did not detect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec, ImplementationBase, ImplementationUnsupported


def check_lora_params(params: dict[str, Any], allowed: dict[str, Any], unsupported: dict[str, str]) -> None:
    """The protocol's LoRA parameters against a library's: an unknown name is a ``TypeError`` naming the valid ones; a
    parameter that asks for what the library lacks (``unsupported``: capability -> reason; rsLoRA, a LoRA bias,
    ``clone_base_output=False``) raises ``ImplementationUnsupported`` with the reason."""
    extra = set(params) - set(allowed)
    if extra:
        raise TypeError(f"unknown lora parameter(s) {sorted(extra)}; the protocol's lora parameters are "
                        f"{sorted(allowed)}")
    for key, capability in (("use_rslora", "rslora"), ("lora_bias", "lora_bias")):
        if params.get(key, False) and capability in unsupported:
            raise ImplementationUnsupported(unsupported[capability])
    if params.get("clone_base_output", True) is not True:
        raise ImplementationUnsupported(unsupported["clone_base_output=False"])


class LibraryImplementation(ImplementationBase):
    """An installed library, seen through an instance of ``api_class``."""

    api_class: ClassVar[type]

    def __init__(self) -> None:
        self._api: Any = self.api_class()
        self.methods = self._api.methods()
        self.capabilities = self._api.capabilities()
        #: method, capability (or option) -> why this version of the library does not support it
        self.unsupported: dict[str, str] = dict(self._api.unsupported)
        #: known per-method gaps passed through to the library (e.g. no mixed batches for OFT):
        #: capability -> {method: reason}
        self.limitations: dict[str, dict[str, str]] = {
            k: dict(v) for k, v in (getattr(self._api, "limitations", {}) or {}).items()}

    def version(self) -> str:
        return self._api.version

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        return self._api.build(base_layer, spec)


class LibraryLayer(nn.Module):
    """What every wrapped library layer delegates unchanged to the library's own layer (``self.layer``): the
    forward (``adapter_names`` passed only when given, so a library without mixed batches raises its own error)
    and the ``merged`` flag. Everything a library names differently stays in its wrapper."""

    layer: nn.Module

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        if adapter_names is None:
            return self.layer(x)
        return self.layer(x, adapter_names=adapter_names)

    @property
    def merged(self) -> bool:
        return bool(self.layer.merged)
