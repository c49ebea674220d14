"""Broken twins of the OFT-math clauses: the reference with one plausible bug each."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin, with_params
from conformance.clauses.interface import AdapterSpec
from conformance.reference import rotation

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}


@twin("OFT-CAYLEY-EXACT", "transposed-rotation")
def transposed_rotation(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.get_delta_weight
    bind(layer, "get_delta_weight", lambda self, name: orig(name).t())


@twin("OFT-ORTHOGONAL", "scaled-rotation")
def scaled_rotation(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.get_delta_weight
    bind(layer, "get_delta_weight", lambda self, name: orig(name) * 1.001)


@twin("OFT-NEUMANN-CONVERGES", "peft-neumann")
def peft_neumann(layer: nn.Module, spec: AdapterSpec) -> None:
    """PEFT 0.21 _cayley_batch Neumann branch: I + 2Q + 2Q^2 + ... + Q^(n-1) (the transpose's series)."""
    orig = layer.rotation_blocks

    def blocks(self: nn.Module, name: str) -> torch.Tensor:
        cfg = self.configs[name]
        if not cfg.use_cayley_neumann:
            return orig(name)
        _, size = self.layout(name)
        q = rotation.skew(self.oft_R[name], size)
        eye = torch.eye(size, dtype=q.dtype).expand_as(q)
        r = eye.clone()
        n = cfg.num_cayley_neumann_terms
        if n > 1:
            r = r + 2 * q
            if n > 2:
                q2 = q @ q
                r = r + 2 * q2
                p = q2
                for _ in range(3, n - 1):
                    p = p @ q
                    r = r + 2 * p
                r = r + p @ q
        return r
    bind(layer, "rotation_blocks", blocks)


@twin("OFT-COFT-RADIUS", "ignore-coft")
def ignore_coft(layer: nn.Module, spec: AdapterSpec) -> None:
    name = spec.adapter_name
    if spec.method == "oft":
        layer.configs[name] = dataclasses.replace(layer.configs[name], coft=False)


def drop_block_share(method: str, params: dict[str, Any]) -> dict[str, Any]:
    params.pop("block_share", None)
    return params

BROKEN["OFT-BLOCK-SHARE"] = Broken("drop-block-share", spec_hook=with_params(block_share=drop_block_share))
