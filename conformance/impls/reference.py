"""The reference layers as an implementation under test."""

from __future__ import annotations

from torch import nn

import conformance
from conformance.clauses.interface import AdapterSpec, ImplementationBase
from conformance.core.vocabulary import LORA_LIKE, ORACLE_METHODS, Capability, Method
from conformance.quant.layers import bits_of, is_dense
from conformance.reference import DENSE, layer_class
from conformance.reference.model import ReferenceModelEntry


class ReferenceImplementation(ImplementationBase):
    name = "reference"
    methods = ORACLE_METHODS
    #: every capability but whole PEFT models (the reference is layers only) and the initializations that need the
    #: implementation's own preparation step (CorDA's calibration, LoRA-GA's gradient: the yardstick has PiSSA, OLoRA
    #: and LoftQ, ``conformance.reference.inits``)
    capabilities = frozenset(Capability) - {Capability.INIT_CORDA, Capability.INIT_LORA_GA}
    #: what DoRA leaves out, as PEFT does (``conformance.reference.dora``)
    limitations = {
        Capability.MIXED_BATCH: {Method.DORA: "DoRA takes no adapter_names (PEFT 0.21 peft/tuners/lora/layer.py: "
                                              "'Cannot pass `adapter_names` when DoRA is enabled.')"},
        Capability.LORA_BIAS: {Method.DORA: "DoRA takes no lora_bias (PEFT 0.21 LoraConfig refuses use_dora with "
                                            "lora_bias)"},
    }

    def __init__(self, clone_base_output: bool = True) -> None:
        self.clone_base_output = clone_base_output

    @property
    def model(self) -> ReferenceModelEntry:
        """The model-level entry (capability ``model``): this implementation's layers attached by target names."""
        return ReferenceModelEntry(self.create, AdapterSpec)

    def version(self) -> str:
        return conformance.__version__

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        cls = layer_class(spec.method, DENSE if is_dense(base_layer) else bits_of(base_layer))
        params = dict(spec.params)
        if spec.method in LORA_LIKE:
            params.setdefault("clone_base_output", self.clone_base_output)
        layer = cls(base_layer, spec.adapter_name, **params)
        cast_adapter(layer, spec)
        return layer


def cast_adapter(layer: nn.Module, spec: AdapterSpec) -> None:
    """Put the adapter's parameters in ``spec.dtype`` (they are built in float32)."""
    if spec.dtype != "float32":
        for p in layer.adapter_parameters(spec.adapter_name).values():
            if p.is_floating_point():  # index tensors (PEFT SHiRA's) keep their dtype
                p.data = p.data.to(spec.torch_dtype)
