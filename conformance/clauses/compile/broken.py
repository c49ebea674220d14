"""Broken twins of the compile clauses: the reference with one plausible bug each."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, cache_base_forward, twin
from conformance.clauses.interface import AdapterSpec

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}


@twin("COMPILE-FORWARD", "forward-compiler-disabled")
def forward_compiler_disabled(layer: nn.Module, spec: AdapterSpec) -> None:
    """The forward is wrapped in ``torch.compiler.disable`` (as a library might do to keep bitsandbytes' graph
    breaks out of users' graphs): the outputs are right, but every call through ``torch.compile`` runs eagerly."""
    eager = torch.compiler.disable(type(layer).forward)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return eager(self, *args, **kwargs)

    bind(layer, "forward", forward)


@twin("COMPILE-MERGE-CYCLE", "unmerge-keeps-cached-weight", shows_on="lora/4bit")
def unmerge_keeps_cached_weight(layer: nn.Module, spec: AdapterSpec) -> None:
    """The base output comes from a dequantized weight cached at the first forward; merge() drops the cache but
    unmerge() does not, so the forward after unmerge reads the merged weight and adds the adapter a second time."""
    cache = cache_base_forward(layer)
    merge, unmerge = layer.merge, layer.unmerge

    def merge_(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        cache.clear()
        merge(*args, **kwargs)

    def unmerge_(self: nn.Module) -> None:
        unmerge()  # the bug: the cached (merged) weight stays

    bind(layer, "merge", merge_)
    bind(layer, "unmerge", unmerge_)
