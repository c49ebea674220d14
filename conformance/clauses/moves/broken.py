"""Broken twins of the moves clauses: the reference with one plausible bug each."""

from __future__ import annotations

from typing import Any

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
