"""bitsandbytes 0.50.x under torch's FSDP2: fully_shard accepts a Linear8bitLt, but the weight it gathers for a
forward is a plain Parameter, without Int8Params' CB and SCB attributes, and Linear8bitLt.forward reads
self.weight.CB first: AttributeError: 'Parameter' object has no attribute 'CB' (bitsandbytes has no counterpart of the
4-bit fix_4bit_weight_quant_state_from_module for 8-bit layers). The int8 statistics are still in layer.state; no
forward or training step runs. World size 1 and 2.

Run: python xfails/bitsandbytes/fsdp2_int8_weight_attrs.py   (exit 1: reproduced, 0: fixed, 2: this torch has no gloo
or no FSDP2). Uses bitsandbytes and torch only: gloo ranks on the CPU."""

import os
import socket
import sys
import tempfile

import bitsandbytes as bnb
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    lin = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=0.0)
    lin.weight = bnb.nn.Int8Params(torch.randn(64, 64).half() / 8, requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = lin(x)
    model = torch.nn.Sequential(lin)
    try:
        fully_shard(model)
    except Exception as exc:  # a refusal at wrap time would be a clear answer
        result = f"refused at wrap time: {type(exc).__name__}: {exc}"
    else:
        try:
            with torch.no_grad():
                got = model(x)
            result = f"forward ran, max |diff| {float((got - want).abs().max()):.3g}"
        except Exception as exc:  # noqa: BLE001 - the failure this script shows
            result = f"forward raised {type(exc).__name__}: {exc}"
    with open(os.path.join(out, f"w{world}r{rank}.txt"), "w") as fh:
        fh.write(f"world {world} rank {rank}: {result}")
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
    raised = False
    with tempfile.TemporaryDirectory() as out:
        for world in (1, 2):
            mp.spawn(rank_main, args=(world, free_port(), out), nprocs=world, join=True)
            for rank in range(world):
                with open(os.path.join(out, f"w{world}r{rank}.txt")) as fh:
                    line = fh.read()
                print(line)
                raised = raised or "has no attribute 'CB'" in line
    if raised:
        print("reproduced: the forward of the FSDP2-wrapped Linear8bitLt reads weight.CB, which the gathered weight lacks")
        sys.exit(1)
    print("fixed: the FSDP2-wrapped Linear8bitLt runs its forward (or fully_shard refuses it at wrap time)")
