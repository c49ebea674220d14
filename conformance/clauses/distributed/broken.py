"""Broken twins of the distributed clauses: LoRA and DoRA broken one way per family, so one spawned process group
shows every breakage (DDP: ``OneBreakagePerFamily``, ``suites/test_distributed.py``; FSDP2: ``FsdpBreakages``,
``suites/test_fsdp.py``). Defined in the package so they pickle into the spawned ranks, which import this module by
name."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch import nn

from conformance.core.vocabulary import LORA_LIKE
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import layers as qlayers


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


def merge_reads_the_shard(layer: nn.Module) -> nn.Module:
    """``merge()`` that, on a base FSDP2 has sharded, takes the rank's shard for the whole payload: it wraps the local
    shard in a ``Params4bit`` with the module's quant state (what bitsandbytes' own reattachment does with whatever
    weight the module holds) and merges that. Right on one rank, where the shard is the whole payload; wrong as soon
    as the payload is split."""
    merge = layer.merge

    def merge_local(*args: object, **kwargs: object) -> None:
        base = layer.base_layer
        if qlayers.is_sharded(base):
            qs = base.quant_state
            base.weight = bnb.nn.Params4bit(base.weight.to_local(), requires_grad=False, quant_state=qs,
                                            blocksize=qs.blocksize, compress_statistics=qs.nested,
                                            quant_type=qs.quant_type, quant_storage=base.quant_storage, module=base,
                                            bnb_quantized=True)
        merge(*args, **kwargs)

    object.__setattr__(layer, "merge", merge_local)
    return layer


class FsdpBreakages(ReferenceImplementation):
    """The DIST-FSDP2-* clauses' broken twin, one breakage per family so one spawned group shows both (4-bit only:
    8-bit bases fail in bitsandbytes whatever the adapter): LoRA's lora_B created outside the wrapped module tree (a
    plain attribute: FSDP2 neither shards it nor reduces its gradient, and the model's state dict does not hold it);
    DoRA's merge reads the rank's shard as the whole payload (``merge_reads_the_shard``)."""

    name = "fsdp2-breakages"
    methods = frozenset({"lora", "dora"})
    capabilities = frozenset({"4bit", "distributed"})

    def create(self, base_layer, spec):
        layer = super().create(base_layer, spec)
        if spec.method == "dora":
            return merge_reads_the_shard(layer)
        return hidden_from_ddp(layer)
