"""What the wrappers of installed third-party libraries share: a version-aware API object decides everything.

A wrapper (``conformance.impls.peft``, ``conformance.impls.litgpt``) keeps the library's API detection in one
``*Api`` class (version, the capabilities it really has, why the others are missing, per-method limitations,
``build(base, spec)``); this base class only exposes it through the implementation protocol, so no wrapper can
declare a capability its API object did not detect.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from conformance.spec.interface import AdapterSpec, ImplementationBase


class LibraryImplementation(ImplementationBase):
    """An installed library, seen through an instance of ``api_class``."""

    api_class: ClassVar[type]

    def __init__(self) -> None:
        self._api: Any = self.api_class()
        self.capabilities = self._api.capabilities()
        #: capability (or option) -> why this version of the library does not support it
        self.unsupported: dict[str, str] = dict(self._api.unsupported)
        #: known per-method gaps passed through to the library (e.g. no mixed batches for OFT)
        self.limitations: dict[str, str] = dict(getattr(self._api, "limitations", {}) or {})

    def version(self) -> str:
        return self._api.version

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        return self._api.build(base_layer, spec)
