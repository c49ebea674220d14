"""The reference layers as an implementation under test."""

from __future__ import annotations

from torch import nn

import conformance
from conformance.quant.layers import bits_of
from conformance.reference import layer_class
from conformance.spec.interface import AdapterSpec, ImplementationBase


class ReferenceImplementation(ImplementationBase):
    name = "reference"
    capabilities = frozenset(
        {"lora", "oft", "4bit", "8bit", "multi_adapter", "mixed_batch", "lora_bias", "disable_adapters",
         "delete_adapter", "cuda", "unmerge", "safe_merge", "rslora", "dropout"}
    )

    def __init__(self, clone_base_output: bool = True) -> None:
        self.clone_base_output = clone_base_output

    def version(self) -> str:
        return conformance.__version__

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        cls = layer_class(spec.method, bits_of(base_layer))
        params = dict(spec.params)
        if spec.method == "lora":
            params.setdefault("clone_base_output", self.clone_base_output)
        return cls(base_layer, spec.adapter_name, **params)
