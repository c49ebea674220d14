"""Broken twins of the paths clauses: the reference with one plausible bug each."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, cache_base_forward, twin
from conformance.clauses.interface import AdapterSpec

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}
#: further (clause, twin) pairs: ``naive-dequantize-merge`` fails only where the CPU packed layout exists
MORE: list[tuple[str, Broken]] = []


@twin("PATH-SEQUENCE", "stale-base-weight")
def stale_base_weight(layer: nn.Module, spec: AdapterSpec) -> None:
    """The base output comes from the weight read at the first forward and kept: a repack, a merge or an unmerge
    after it is not seen (the merged layer's forward misses the merged delta)."""
    cache_base_forward(layer)


@twin("PATH-SEQUENCE", "naive-dequantize-merge", more=True)
def naive_dequantize_merge(layer: nn.Module, spec: AdapterSpec) -> None:
    """merge/unmerge read the 4-bit base as ``dequantize_4bit(weight.data, weight.quant_state)``, as PEFT v0.21.2's
    ``dequantize_bnb_weight`` does: right in the standard layout, garbage once bitsandbytes repacked the weight
    for the CPU."""
    orig = layer._current

    def current(self: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(self.base_layer, bnb.nn.Linear4bit):
            return orig()
        w = self.base_layer.weight
        bias = getattr(self.base_layer, "bias", None)
        weight = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        return weight, None if bias is None else bias.detach().float()

    bind(layer, "_current", current)
