"""bitsandbytes 0.50.x under torch's FSDP2: the state dict of a Linear4bit that fully_shard has sharded holds the
payload but none of its quant state (absmax, quant_map, the nested statistics, quant_state.bitsandbytes__nf4), so a
checkpoint of the wrapped model cannot be read back as a 4-bit layer. The forward is fine: Linear4bit.forward
reattaches the module's quant_state to the gathered weight (fix_4bit_weight_quant_state_from_module), but
Linear4bit._save_to_state_dict reads self.weight.quant_state only, and FSDP2's weight is a DTensor without one.
Every quant_storage (uint8 and the float ones FSDP-QLoRA uses), world size 1 and 2.

Run: python xfails/bitsandbytes/fsdp2_state_dict_quant_state.py   (exit 1: reproduced, 0: fixed, 2: this torch has no
gloo or no FSDP2). Uses bitsandbytes and torch only: two gloo ranks on the CPU."""

import os
import socket
import sys
import tempfile

import bitsandbytes as bnb
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def layer(storage: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4", quant_storage=storage)
    lin.support_avx512bf16_for_cpu = False  # the standard layout on every CPU
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", quant_storage=storage, module=lin)
    return lin.to("cpu")


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lines = []
    for storage in STORAGES:
        lin = layer(storage)
        want = sorted(lin.state_dict())
        model = torch.nn.Sequential(lin)
        fully_shard(model)
        got = sorted(k.removeprefix("0.") for k in model.state_dict())
        with torch.no_grad():
            model(torch.randn(2, 64))  # the forward works: bitsandbytes reattaches the module's quant state
        lost = sorted(set(want) - set(got))
        lines.append(f"world {world} rank {rank} quant_storage {str(storage).removeprefix('torch.')}: "
                     f"unwrapped keys {want}, wrapped keys {got}, lost {lost}")
    with open(os.path.join(out, f"w{world}r{rank}.txt"), "w") as fh:
        fh.write("\n".join(lines))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        print(f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)")
        sys.exit(2)
    if not (dist.is_available() and dist.is_gloo_available()):
        print(f"torch {torch.__version__} has no gloo backend")
        sys.exit(2)
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}")
    os.environ["OMP_NUM_THREADS"] = "1"
    lost_any = False
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(rank_main, args=(world, free_port(), out), nprocs=world, join=True)
            for rank in range(world):
                with open(os.path.join(out, f"w{world}r{rank}.txt")) as fh:
                    text = fh.read()
                print(text)
                lost_any = lost_any or any(not line.endswith("lost []") for line in text.splitlines())
    if lost_any:
        print("reproduced: the state dict of the sharded Linear4bit lacks its quant state")
        sys.exit(1)
    print("fixed: the sharded Linear4bit saves its quant state")
