"""Broken twins of the twin clauses: the reference LoRA with one bug each, on its quantized path only.

A bug that the dense layer shares would go unseen by a twin comparison (both sides carry it); a library's bnb code
path is its own (PEFT's ``bnb.py`` per method), so each twin breaks the layer only when its base is quantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin
from conformance.clauses.interface import AdapterSpec
from conformance.quant import layers as qlayers
from conformance.reference.adapter_layer import QuantAdapterLayer

#: one broken twin per clause of the area (``@twin``)
BROKEN: dict[str, Broken] = {}


def _quantized_lora(layer: nn.Module, spec: AdapterSpec) -> bool:
    return spec.method == "lora" and qlayers.is_quantized(layer.base_layer)


@twin("TWIN-FORWARD", "forward-unscaled")
def forward_unscaled(layer: nn.Module, spec: AdapterSpec) -> None:
    """The forward adds B(Ax) without the scaling alpha / r (the dense layer scales)."""
    if _quantized_lora(layer, spec):
        layer.scaling = {name: 1.0 for name in layer.scaling}


@twin("TWIN-BACKWARD", "adapter-input-detached")
def adapter_input_detached(layer: nn.Module, spec: AdapterSpec) -> None:
    """The adapter path reads a detached input: no gradient reaches x through the adapter."""
    if _quantized_lora(layer, spec):
        add = type(layer)._add_lora
        bind(layer, "_add_lora", lambda self, name, x, result, inplace: add(self, name, x.detach(), result, inplace))


@twin("TWIN-MERGE", "merge-delta-twice")
def merge_delta_twice(layer: nn.Module, spec: AdapterSpec) -> None:
    """The merge adds the delta twice."""
    if _quantized_lora(layer, spec):
        bind(layer, "_merged_weights", lambda self, name, w, b: (
            w + 2 * self.get_delta_weight(name).detach().float(), b))


@twin("TWIN-MERGE-WARNS", "merge-silent")
def merge_silent(layer: nn.Module, spec: AdapterSpec) -> None:
    """The merge into a quantized base says nothing about rounding."""
    if _quantized_lora(layer, spec):
        layer.merge_warning = ""


@twin("TWIN-UNMERGE", "unmerge-partial")
def unmerge_partial(layer: nn.Module, spec: AdapterSpec) -> None:
    """The unmerge subtracts 0.9 of the delta."""
    if _quantized_lora(layer, spec):
        bind(layer, "_unmerged_weights", lambda self, name, w, b: (
            w - 0.9 * self.get_delta_weight(name).detach().float(), b))


@twin("TWIN-CREATE", "accepts-then-crashes")
def accepts_then_crashes(layer: nn.Module, spec: AdapterSpec) -> None:
    """Accepts a quantized base at create, then its forward cannot use it."""
    if _quantized_lora(layer, spec):
        def forward(self: nn.Module, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
            raise RuntimeError("expected a floating-point weight, got a packed one")
        bind(layer, "forward", forward)


@twin("TWIN-CREATE-NAMES", "refuses-silently")
def refuses_silently(layer: nn.Module, spec: AdapterSpec) -> None:
    """Refuses a quantized base with an error that says nothing."""
    if _quantized_lora(layer, spec):
        raise ValueError()


@twin("TWIN-SAFE-MERGE", "safe-merge-unchecked")
def safe_merge_unchecked(layer: nn.Module, spec: AdapterSpec) -> None:
    """merge(safe_merge=True) merges without the check."""
    if _quantized_lora(layer, spec):
        def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
            QuantAdapterLayer.merge(self, False, adapter_names)
        bind(layer, "merge", merge)
