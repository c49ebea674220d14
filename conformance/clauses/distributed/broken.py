"""Broken twins of the distributed clause: LoRA and DoRA broken one way per family, so one spawned process group
shows every breakage (``suites/test_distributed.py``). Defined in the package so they pickle into the spawned ranks,
which import this module by name."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch import nn

from conformance.core.vocabulary import LORA_LIKE
from conformance.impls.reference import ReferenceImplementation


def per_rank_state(layer: nn.Module, base_layer: nn.Module) -> nn.Module:
    """Adapter state outside parameters and buffers that differs per rank (seeded by the rank): DDP
    cannot synchronise it, so the averaged gradient is not the single-process one."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    offset = torch.randn(base_layer.out_features, generator=torch.Generator().manual_seed(rank)) * 0.1
    layer.register_forward_hook(lambda _m, _args, out: out + offset.to(out))
    return layer


def hidden_from_ddp(layer: nn.Module, module: str = "lora_B") -> nn.Module:
    """``module`` (lora_B; DoRA's magnitude ``lora_magnitude_vector``) held outside the module tree: still trained
    through adapter_parameters, but DDP never all-reduces its gradient, so the ranks drift apart."""
    holder = layer._modules.pop(module)
    object.__setattr__(layer, module, holder)
    return layer


class OneBreakagePerFamily(ReferenceImplementation):
    """LoRA broken one way per family: per-rank state on 4-bit bases, lora_B hidden from DDP on 8-bit ones; DoRA:
    its magnitude hidden from DDP (a plain attribute, not a submodule), on both. The clause judges each family on
    its own, so one spawned run shows every breakage (one process group, not several)."""

    name = "one-breakage-per-family"
    methods = LORA_LIKE
    capabilities = frozenset({"4bit", "8bit", "distributed"})

    def create(self, base_layer, spec):
        layer = super().create(base_layer, spec)
        if spec.method == "dora":
            return hidden_from_ddp(layer, "lora_magnitude_vector")
        if isinstance(base_layer, bnb.nn.Linear4bit):
            return per_rank_state(layer, base_layer)
        return hidden_from_ddp(layer)
