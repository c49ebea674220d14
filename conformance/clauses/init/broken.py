"""Broken twins of the init clauses: the reference LoRA with one bug each in its initializations that read the base
(``conformance.reference.inits``); each patch acts only on a layer whose adapter was made by such an initialization
over a quantized base."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from conformance.clauses.broken import Broken, twin
from conformance.clauses.interface import AdapterSpec
from conformance.core.inits import of_value
from conformance.quant import layers as qlayers

#: one broken twin per clause of the area (``@twin``)
BROKEN: dict[str, Broken] = {}
#: further (clause, twin) pairs (``@twin(..., more=True)``)
MORE: list[tuple[str, Broken]] = []


def _initialized(layer: nn.Module, spec: AdapterSpec) -> bool:
    return (spec.method == "lora" and of_value(spec.params.get("init_lora_weights")) is not None
            and qlayers.is_quantized(layer.base_layer))


@twin("INIT-CREATE", "residual-with-default-settings")
def residual_with_default_settings(layer: nn.Module, spec: AdapterSpec) -> None:
    """The residual is requantized with bitsandbytes' defaults (blocksize 64, no double quant, uint8 storage),
    not with the base's own settings (what a rebuild that forwards only some of them does)."""
    base = layer.base_layer
    if _initialized(layer, spec) and qlayers.bits_of(base) == 4:
        w = qlayers.dequantize(base)
        base.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=base.weight.quant_type,
                                        module=base).to(base.weight.device)


@twin("INIT-NAMES", "refuses-silently")
def refuses_silently(layer: nn.Module, spec: AdapterSpec) -> None:
    """Refuses a quantized base with an error that says nothing."""
    if _initialized(layer, spec):
        raise ValueError()


@twin("INIT-RESIDUAL", "residual-not-written")
def residual_not_written(layer: nn.Module, spec: AdapterSpec) -> None:
    """The adapter takes the top of the weight but the base keeps all of it (the residual is never written back);
    LoftQ's adapter fits the quantization error with the wrong sign."""
    if not _initialized(layer, spec):
        return
    name = spec.adapter_name
    if spec.params["init_lora_weights"] == "loftq":
        with torch.no_grad():
            layer.lora_B[name].weight.neg_()
        return
    w = qlayers.dequantize(layer.base_layer)
    qlayers.requantize(layer.base_layer, w + layer.get_delta_weight(name).detach().float())


@twin("INIT-OUTPUT", "forward-scaling-twice")
def forward_scaling_twice(layer: nn.Module, spec: AdapterSpec) -> None:
    """The residual is right but the forward scales the adapter by alpha / r twice (a decomposition that divides the
    singular values by the scaling in one place and not the other)."""
    if _initialized(layer, spec):
        layer.scaling = {k: 2 * v for k, v in layer.scaling.items()}


@twin("INIT-RESIDUAL", "loftq-ignores-scaling", more=True)
def loftq_ignores_scaling(layer: nn.Module, spec: AdapterSpec) -> None:
    """LoftQ's factors fit the quantization error as B A, and the forward scales them by alpha / r on top (what a
    decomposition that never divides by the scaling gives: scaling 2 doubles the fitted error)."""
    if _initialized(layer, spec) and spec.params["init_lora_weights"] == "loftq":
        name = spec.adapter_name
        with torch.no_grad():
            layer.lora_B[name].weight.mul_(layer.scaling[name])
