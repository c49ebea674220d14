"""The expected output of an implementation's layer, one oracle per adapter method (``layer_expected``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .dora import dora_expected
from .expected import Expected, lora_expected, lora_scaling, oft_expected


def dora_layer_expected(
    layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor, *, training: bool | None = None
) -> Expected:
    """Expected output of an implementation's DoRA layer (unmerged, adapter ``name`` alone active)."""
    return dora_expected(layer.base_layer, layer.adapter_parameters(name), lora_scaling(params), x, training=training)


def layer_expected(
    layer: nn.Module, method: str, name: str, params: Mapping[str, Any], x: torch.Tensor,
    *, training: bool | None = None,
) -> Expected:
    """Dispatch to ``lora_expected`` / ``oft_expected`` / ``dora_layer_expected``."""
    if method == "lora":
        return lora_expected(layer, name, params, x, training=training)
    if method == "oft":
        return oft_expected(layer, name, params, x, training=training)
    if method == "dora":
        return dora_layer_expected(layer, name, params, x, training=training)
    raise ValueError(f"unknown method {method!r}; expected 'lora', 'oft' or 'dora'")
