"""Broken twins of the moves clauses: the reference with one plausible bug each."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin
from conformance.clauses.interface import AdapterSpec

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}


@twin("MOVE-DTYPE", "vague-refusal")
def vague_refusal(layer: nn.Module, spec: AdapterSpec) -> None:
    """Every dtype cast is refused with a message that names nothing the user could act on."""

    def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        raise TypeError("unsupported operation")

    bind(layer, "_apply", _apply)


@twin("MOVE-DEVICE", "move-rounds-absmax")
def move_rounds_absmax(layer: nn.Module, spec: AdapterSpec) -> None:
    """Every move (``_apply``) sends the base's quantization statistics through bfloat16 and back, as a move that
    stages them in the compute dtype would: their dtype is kept, their values are rounded, and the layer
    silently computes with another weight (4-bit: the float absmax, ``state2.absmax`` under double quant;
    8-bit: the row statistics SCB)."""
    apply = type(layer)._apply

    def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        out = apply(self, fn, recurse)
        base = self.base_layer
        qs = getattr(base.weight, "quant_state", None)
        if qs is not None:
            holder = qs.state2 if qs.nested else qs
            holder.absmax = holder.absmax.to(torch.bfloat16).to(holder.absmax.dtype)
        else:
            for obj in (base.weight, base.state):
                if getattr(obj, "SCB", None) is not None:
                    obj.SCB = obj.SCB.to(torch.bfloat16).to(obj.SCB.dtype)
        return out

    bind(layer, "_apply", _apply)
