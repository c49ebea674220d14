#!/usr/bin/env python
"""PEFT's bitsandbytes merge cannot read a weight that torch's FSDP2 gathered: after ``unshard()`` it raises.

Plain torch + bitsandbytes + PEFT, gloo on the CPU, no conformance import. Found by DIST-FSDP2-MERGE.

FSDP-QLoRA wraps a PEFT model with ``fully_shard`` (torch's FSDP2): every parameter becomes a DTensor shard, and
``unshard()`` (or the pre-forward hook) puts the gathered weight back in the module as a plain ``Parameter``. For a
4-bit layer, bitsandbytes' own forward copes: ``Linear4bit.forward`` reattaches the quant state it keeps on the module
(``fix_4bit_weight_quant_state_from_module``), so the wrapped model trains and its forward is right. PEFT 0.21.2's
merge (``lora/bnb.py`` ``Linear4bit.merge`` -> ``dequantize_bnb_weight(weight, state=weight.quant_state)``) reads
the quant state off the weight only: on the unsharded weight it raises ``AttributeError: 'Parameter' object has no
attribute 'quant_state'``, where bitsandbytes finds it on the module. 8-bit (``Linear8bitLt``): the merge reads
``weight.has_fp16_weights`` and raises the same way (bitsandbytes' own 8-bit forward fails under FSDP2 too:
xfails/bitsandbytes/fsdp2_int8_weight_attrs.py). Merging the still-sharded model raises on the DTensor instead (that
error at least names it). Every quant_storage, world size 1 and 2.

After a bitsandbytes forward of the unsharded layer the same merge runs, but wrongly: bitsandbytes' reattachment puts
in a ``Params4bit`` with its constructor defaults (quant_type fp4, compress_statistics True) next to the right quant
state, and PEFT requantizes the merged weight with ``weight.__dict__``: an NF4 base comes back FP4, silently. What
PEFT needs (the module's ``quant_state``) is there before that forward too.

Run: ``python peft_fsdp2_merge_unsharded.py``. Exit 1 when PEFT's merge of an unsharded 4-bit layer raises while
bitsandbytes' forward of it runs, 0 when the merge works, 2 when this torch has no gloo or no FSDP2.
"""

import os
import socket
import sys
import tempfile
import warnings

import bitsandbytes as bnb
import peft
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module, bits: int) -> None:
        super().__init__()
        self.lin = base
        setattr(self, f"is_loaded_in_{bits}bit", True)  # what transformers' bnb quantizers set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def base(bits: int, storage: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    w = torch.randn(64, 64) / 8
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
        layer.support_avx512bf16_for_cpu = False  # the standard layout on every CPU
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=storage, module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def merge(model: nn.Module) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.lin.merge()
        return "merge works"
    except Exception as exc:  # noqa: BLE001 - the defect shown
        return f"merge raises {type(exc).__name__}: {exc}"


def one(bits: int, storage: torch.dtype, sharded: bool) -> str:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = OneLayer(base(bits, storage), bits)
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["lin"]))
    x = torch.randn(4, 64)
    with torch.no_grad():
        model(x)  # settle: bitsandbytes casts the bias on the first forward
    fully_shard(model.lin)
    fully_shard(model)
    try:
        with torch.no_grad():
            model(x)  # a forward of the wrapped model (FSDP2 reshards after it)
    except Exception as exc:  # noqa: BLE001 - 8-bit: bitsandbytes' own failure, reported
        return f"the wrapped forward raises {type(exc).__name__}: {exc}"
    if sharded:
        return merge(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
    first = merge(model)
    try:
        with torch.no_grad():
            model.lin.base_layer(x)  # bitsandbytes' forward reattaches the module's quant state (4-bit)
        fwd = "bitsandbytes forward runs"
    except Exception as exc:  # noqa: BLE001 - reported
        fwd = f"bitsandbytes forward raises {type(exc).__name__}: {exc}"
    second = merge(model) if first != "merge works" else "merged"
    qs = getattr(model.lin.base_layer.weight, "quant_state", None)
    settings = f" (merged base: {qs.quant_type}, blocksize {qs.blocksize}; the base was nf4, 64)" if qs is not None else ""
    return f"{first}; then {fwd}; then {second}{settings}"


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lines = []
    for bits, storage in [(4, s) for s in STORAGES] + [(8, torch.int8)]:
        for sharded in (False, True):
            what = f"{bits}-bit {str(storage).removeprefix('torch.')} {'sharded' if sharded else 'after unshard()'}"
            lines.append(f"world {world} rank {rank} {what}: {one(bits, storage, sharded)}")
    with open(os.path.join(out, f"w{world}r{rank}.txt"), "w") as fh:
        fh.write("\n".join(lines))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        print(f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)")
        return 2
    if not (dist.is_available() and dist.is_gloo_available()):
        print(f"torch {torch.__version__} has no gloo backend")
        return 2
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, gloo on the CPU")
    os.environ["OMP_NUM_THREADS"] = "1"
    defects = 0
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(rank_main, args=(world, free_port(), out), nprocs=world, join=True)
            for rank in range(world):
                with open(os.path.join(out, f"w{world}r{rank}.txt")) as fh:
                    for line in fh.read().splitlines():
                        print(line)
                        defects += ("4-bit" in line and "after unshard(): merge raises" in line
                                    and "forward runs" in line)
                        defects += "merged base: fp4" in line
    print(f"DEFECT: {defects} defects: PEFT's merge raises on unsharded 4-bit layers whose bitsandbytes forward runs, "
          "and after that forward requantizes an nf4 base as fp4" if defects else "no defect")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
