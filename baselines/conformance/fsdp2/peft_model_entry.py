#!/usr/bin/env python
"""PEFT's model entry (``get_peft_model`` on a whole transformers model) under torch's FSDP2, on gloo: a report.

The DIST-FSDP2-* clauses check layers built by ``create`` (the 2-layer stack); a whole transformers model does not
cross spawned ranks as an object, so this script builds it in every rank the way users do and reports what the
clauses ask of it, with PEFT 0.21's model entry (``conformance.impls.peft_model.PeftModelEntry``): the tiny random
Llama of ``conformance.tinymodels`` loaded 4-bit (NF4, double quant, each ``bnb_4bit_quant_storage``) or 8-bit,
LoRA on q_proj/v_proj, ``fully_shard`` on each decoder layer and on the model (FSDP-QLoRA's wrapping), world size 1
and 2. Per case: whether fully_shard accepts it; each bitsandbytes layer's payload gathered against its bytes before
wrapping and whether the module keeps its quant state; whether the full state dict still holds the quant state; the
logits of the wrapped model against the never-wrapped one on the same rows (max |diff|); one training step's LoRA
gradients, gathered, against rank 0's (identical?) and against one process on the whole batch (max |diff| / max
|grad|); the LoRA tensors' sharded state dict saved and loaded with torch.distributed.checkpoint into a fresh wrapped
model (identical?); ``merge_and_unload`` after ``unshard()`` (runs? the merged base's quant type).

Run: ``PYTHONPATH=. python baselines/conformance/fsdp2/peft_model_entry.py`` (writes the table to stdout; the stored
output is ``peft_model_entry.cpu.log`` next to it). It reports; it judges nothing (exit 0 unless it crashes).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STORAGES = ("uint8", "bfloat16", "float16", "float32")
ROWS_PER_RANK = 2
LORA = {"r": 4, "lora_alpha": 8.0, "init_lora_weights": False}


def load(bits: int, storage: str, path: str) -> Any:
    from transformers import BitsAndBytesConfig

    from conformance import tinymodels

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_quant_storage=getattr(torch, storage))
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    with tinymodels.quiet_transformers():
        model = tinymodels.model_class("llama").from_pretrained(
            path, quantization_config=config, device_map="cpu", local_files_only=True,
            **tinymodels.dtype_kwarg(torch.float32))
    for m in tinymodels.bnb_layers(model).values():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # the standard layout on every CPU
    return model


def adapted(bits: int, storage: str, seed: int, path: str) -> Any:
    from conformance import tinymodels
    from conformance.clauses.interface import AdapterSpec
    from conformance.impls.peft import PeftImplementation

    model = load(bits, storage, path)
    torch.manual_seed(seed)
    spec = AdapterSpec(method="lora", params=dict(LORA), dtype="float32")
    return PeftImplementation().model.attach(model, tinymodels.ATTENTION_TARGETS["llama"], spec)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def lora_params(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def wrap(model: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def case(rank: int, world: int, bits: int, storage: str, ckpt: str, path: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FSDPModule

    from conformance import tinymodels
    from conformance.quant import layers as qlayers

    batch = tinymodels.fixed_batch(batch_size=ROWS_PER_RANK * world, seq_len=8)
    mine = {k: v[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK] for k, v in batch.items()}
    model, twin = adapted(bits, storage, 0, path), adapted(bits, storage, 0, path)
    before = {n: m.weight.data.view(torch.uint8).clone() for n, m in tinymodels.bnb_layers(model).items()}
    out: dict[str, Any] = {}
    try:
        wrap(model)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"wrap": f"refused: {type(exc).__name__}: {exc}"}
    out["wrap"] = "accepted"
    layers = tinymodels.bnb_layers(model)
    out["payload kept"] = all(torch.equal(full(m.weight).view(torch.uint8), before[n]) for n, m in layers.items())
    out["quant state on module"] = all(qlayers.quant_state_of(m) is not None for m in layers.values()) if bits == 4 \
        else all(getattr(m.state, "SCB", None) is not None or getattr(m.weight, "SCB", None) is not None
                 for m in layers.values())
    sd_keys = set(model.state_dict())
    out["state dict quant state"] = any(k.endswith(("weight.absmax", ".SCB")) for k in sd_keys)
    try:
        loss = model(**mine).loss
        with torch.no_grad():
            got, want = model(**mine).logits, twin(**mine).logits
        out["logits max |diff|"] = f"{float((got - want).abs().max()):.3g}"
        loss.backward()
        grads = {n: full(p.grad) for n, p in lora_params(model).items()}
        twin.zero_grad()
        twin(**batch).loss.backward()
        ref = {n: p.grad for n, p in lora_params(twin).items()}
        rel = max(float((grads[n] - ref[n]).abs().max()) / max(float(ref[n].abs().max()), 1e-30) for n in ref)
        out["grad vs one process (max rel)"] = f"{rel:.3g}"
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {n: g.sum().item() for n, g in grads.items()})
        out["grads identical across ranks"] = all(g == gathered[0] for g in gathered)
    except Exception as exc:  # noqa: BLE001 - reported
        out["forward/backward"] = f"raised {type(exc).__name__}: {exc}"
    try:
        keys = {n for n in model.state_dict() if "lora_" in n}
        saved = {k: v for k, v in model.state_dict().items() if k in keys}
        dcp.save(saved, checkpoint_id=ckpt)
        fresh = adapted(bits, storage, 1, path)
        wrap(fresh)
        target = {k: v for k, v in fresh.state_dict().items() if k in keys}
        dcp.load(target, checkpoint_id=ckpt)
        fresh.load_state_dict(target, strict=False)
        out["adapter state dict round trip"] = all(
            torch.equal(full(a), full(b)) for a, b in zip(lora_params(model).values(), lora_params(fresh).values()))
    except Exception as exc:  # noqa: BLE001 - reported
        out["adapter state dict round trip"] = f"raised {type(exc).__name__}: {exc}"
    try:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.unshard()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = model.merge_and_unload()
        qs = [qlayers.quant_state_of(m) for m in tinymodels.bnb_layers(merged).values()]
        out["merge after unshard()"] = "runs" + (f" (quant types {sorted({q.quant_type for q in qs})})" if bits == 4
                                                  else "")
    except Exception as exc:  # noqa: BLE001 - reported
        out["merge after unshard()"] = f"raised {type(exc).__name__}: {exc}"
    return out


def rank_main(rank: int, world: int, port: int, out_dir: str, path: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for bits, storage in [(4, s) for s in STORAGES] + [(8, "int8")]:
        got = case(rank, world, bits, storage, os.path.join(out_dir, f"w{world}-{bits}-{storage}.checkpoint"), path)
        rows.append(f"world {world} rank {rank} {bits}-bit {storage}: " + "; ".join(f"{k}: {v}" for k, v in got.items()))
        dist.barrier()
    with open(os.path.join(out_dir, f"w{world}r{rank}.txt"), "w") as fh:
        fh.write("\n".join(rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import bitsandbytes as bnb
    import peft
    import transformers

    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, "
          f"transformers {transformers.__version__}, gloo on the CPU")
    from conformance import tinymodels

    os.environ["OMP_NUM_THREADS"] = "1"
    path = str(tinymodels.saved_model_dir("llama"))  # the float checkpoint every rank loads (saved here, once)
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(rank_main, args=(world, free_port(), out, path), nprocs=world, join=True)
            for rank in range(world):
                with open(os.path.join(out, f"w{world}r{rank}.txt")) as fh:
                    print(fh.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
