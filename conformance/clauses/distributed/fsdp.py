"""FSDP2 (torch's ``fully_shard``) over stacks of adapter layers on quantized bases: what the spawned ranks do.

The DIST-FSDP2-* checks (``conformance.clauses.distributed.fsdp_checks``) judge what this module records. As for DDP
(``conformance.clauses.distributed.checks``, whose stack, batch, loss and way of sending the implementation it shares),
one process group per world size runs every case of every family the implementation covers, and the parent compares.

A case is (method, bits, base): the bases are ``BASES`` (4-bit with double quantization in every ``quant_storage``:
bitsandbytes' uint8 and FSDP-QLoRA's floats; 8-bit). Each rank, per case (``run_case``):

1. builds the 2-layer stack of ``stack.build_stack`` (the implementation's ``create``, fixed seeds) and settles it with
   one no-grad forward (bitsandbytes casts a base bias to the input dtype on the first forward); ``original``: every
   base layer before wrapping (``unwrapped_record``: payload, quant state, its own state dict) and the part of the
   payload this rank's shard must be (``torch.chunk`` along dim 0, FSDP2's sharding);
2. wraps it as FSDP-QLoRA does: ``fully_shard`` on each adapter layer, then on the stack (one process group, a 1-D
   device mesh). An exception here is recorded as the case's ``wrap_error`` and nothing else runs;
3. ``base``: every base layer's payload as this rank holds it (its shard) and gathered (``full_tensor``), the quant state
   where bitsandbytes looks for it (``quant.layers.quant_state_of``; 8-bit: the ``SCB`` statistics and whether the
   weight still has the ``CB``/``SCB`` attributes ``Linear8bitLt.forward`` reads), again after ``unshard()`` (what
   a forward sees), and the full state dict (``get_model_state_dict(full_state_dict=True)``: what a checkpoint of the
   wrapped model holds);
4. ``train``: one training forward on this rank's rows of the batch (each adapter layer's input and output
   recorded), backward, one SGD step: the adapter tensors before, their gradients and the tensors after, gathered;
5. ``state_dict``: the adapters' sharded state dict (the entries of ``model.state_dict()`` that are the tensors
   ``adapter_parameters`` names; a tensor that is not in it is recorded as missing) saved with
   ``torch.distributed.checkpoint`` and loaded into a fresh wrapped stack whose adapters were drawn from another seed;
   the adapters saved and loaded, gathered;
6. ``merge``: ``merge()`` of every adapter layer of that fresh stack while it is sharded (the adapter tensors it
   holds, then the merged base gathered, or the exception it raised), and of the trained stack after ``unshard()`` of
   every FSDP module (the same).

Every stage catches what it raises and records it as a string, so one failing stage leaves the others their
records. All ranks run the same collectives in the same order; the process group's timeout (``PG_TIMEOUT_S``) ends a
rank left waiting, and the clause's timeout the whole run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conformance.clauses.cases import QUANT_STORAGES, BaseCase
from conformance.clauses.distributed import stack
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_name

#: training rows per rank: the batch of a world of W ranks has ROWS_PER_RANK * W rows, rank r takes its r-th block
ROWS_PER_RANK = 4
LR = 0.01
#: how long a rank waits in a collective for the others (a hang ends there; the clause's timeout bounds the run)
PG_TIMEOUT_S = 300
#: the adapters of the fresh stack the state dict is loaded into are drawn from the case's seed plus this
FRESH_ADAPTER_SEED = 500
#: the bases, by their label (``storage_label``)
BASES: dict[int, tuple[BaseCase, ...]] = {
    4: tuple(BaseCase(4, double_quant=True, quant_storage=qs) for qs in QUANT_STORAGES),
    8: (BaseCase(8),),
}

#: a case: (method, bits, storage label)
Case = tuple[str, int, str]


def storage_label(base: BaseCase) -> str:
    """``int8`` for an 8-bit base, else the dtype the 4-bit payload is stored as (``uint8``, ``bfloat16``, ...)."""
    return "int8" if base.bits == 8 else dtype_name(base.quant_storage or torch.uint8)


def base_of(bits: int, storage: str) -> BaseCase:
    return next(b for b in BASES[bits] if storage_label(b) == storage)


def world_sizes(device: str) -> tuple[int, ...]:
    """1 and 2 ranks on the CPU (gloo); on CUDA (NCCL) 1 and every visible GPU (the check skips below 2)."""
    if device.startswith("cuda"):
        return tuple(sorted({1, torch.cuda.device_count()}))
    return (1, 2)


def batch(seed: int, world: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a world of ``world`` ranks: inputs and targets, ``ROWS_PER_RANK * world`` rows."""
    gen = torch.Generator().manual_seed(seed + 2000)
    n = ROWS_PER_RANK * world
    return (torch.randn(n, stack.DIMS[0], generator=gen).to(device),
            torch.randn(n, stack.DIMS[-1], generator=gen).to(device))


def rows(rank: int) -> slice:
    return slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)


# -- reading tensors that may be sharded -------------------------------------------------------------------------

def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU, detached: a ``DTensor`` gathered (a collective: every rank calls it), else itself."""
    whole = t.full_tensor() if is_dtensor(t) else t
    return whole.detach().cpu().clone()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part: a ``DTensor``'s local shard, else the tensor."""
    return (t.to_local() if is_dtensor(t) else t).detach().cpu().clone()


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).clone() if t.numel() else t.reshape(-1).clone()


def quant_state_bytes(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The quant state of a base layer where bitsandbytes looks for it, as raw bytes: 4-bit ``quant_state.<key>``
    (``quant_state_of``: on the weight, else on the module), 8-bit ``SCB`` (on the weight, else in ``layer.state``).
    A state that is nowhere gives no entry."""
    out: dict[str, torch.Tensor] = {}
    if qlayers.bits_of(layer) == 4:
        qs = qlayers.quant_state_of(layer)
        if qs is not None:
            for key, value in qs.as_dict(packed=False).items():
                v = value if isinstance(value, torch.Tensor) else torch.tensor(list(str(value).encode()),
                                                                                dtype=torch.uint8)
                out[f"quant_state.{key}"] = flat_bytes(v)
        return out
    scb = getattr(layer.weight, "SCB", None)
    scb = scb if scb is not None else getattr(getattr(layer, "state", None), "SCB", None)
    if scb is not None:
        out["SCB"] = flat_bytes(scb)
    return out


def int8_attrs_missing(layer: nn.Module) -> list[str]:
    """The attributes bitsandbytes 0.50.2's ``Linear8bitLt.forward`` reads off the weight (``weight.CB``; ``SCB`` beside
    it) that the layer's weight lacks; empty for a 4-bit layer."""
    if qlayers.bits_of(layer) != 8:
        return []
    return [a for a in ("CB", "SCB") if not hasattr(layer.weight, a)]


def base_record(layer: nn.Module) -> dict[str, Any]:
    """A base layer as this rank sees it: ``payload`` (gathered), ``local`` (its shard), ``bias`` (gathered), the quant
    state where bitsandbytes looks for it, the weight's type and the 8-bit attributes it lacks."""
    w = layer.weight
    rec: dict[str, Any] = {"payload": flat_bytes(full(w)), "local": flat_bytes(local(w)),
                           "weight_type": type(w).__name__, "quant_state": quant_state_bytes(layer),
                           "missing_attrs": int8_attrs_missing(layer)}
    if getattr(layer, "bias", None) is not None:
        rec["bias"] = flat_bytes(full(layer.bias))
    return rec


def unwrapped_record(layer: nn.Module) -> dict[str, Any]:
    """``base_record`` of a base that was never wrapped, and its own state dict (what bitsandbytes saves)."""
    rec = base_record(layer)
    rec["state_dict"] = {k: flat_bytes(v) for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    return rec


# -- the stages ------------------------------------------------------------------------------------------------

def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def wrap(model: nn.Module, layers: list[nn.Module], mesh: Any) -> None:
    """FSDP-QLoRA's wrapping: each adapter layer its own FSDP unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def adapter_state_keys(model: nn.Module, layers: list[nn.Module]) -> dict[str, str | None]:
    """Stable adapter name (``checks.adapter_tensors``) -> its key in ``model.state_dict()`` (found by identity among
    the model's parameters and buffers), None for a tensor that is not in the module tree."""
    by_id = {id(t): k for k, t in [*model.named_parameters(), *model.named_buffers()]}
    return {name: by_id.get(id(t)) for name, t in stack.adapter_tensors(layers).items()}


def settled_stack(impl: Any, method: str, base: BaseCase, seed: int, device: str, x: torch.Tensor,
                  adapter_seed: int | None = None) -> tuple[nn.Module, list[nn.Module]]:
    model, layers = stack.build_stack(impl, method, base.bits, seed, device, base_case=base, adapter_seed=adapter_seed)
    model.train()
    with torch.no_grad():
        model(x)
    return model, layers


def base_stage(model: nn.Module, layers: list[nn.Module]) -> dict[str, Any]:
    """Every base layer as wrapped (its shard, gathered) and after ``unshard()`` of every FSDP module (what a forward
    sees), resharded afterwards."""
    rec: dict[str, Any] = {"wrapped": [base_record(layer.base_layer) for layer in layers]}
    for m in fsdp_modules(model):
        m.unshard()
    rec["unsharded"] = [base_record(layer.base_layer) for layer in layers]
    for m in fsdp_modules(model):
        m.reshard()
    return rec


def base_state_dict_stage(model: nn.Module, layers: list[nn.Module]) -> dict[str, Any]:
    """Each base layer's entries of the wrapped model's state dict, gathered (``full``), by their key in the layer."""
    sd = model.state_dict()
    out = []
    for layer in layers:
        p = _prefix_of(model, layer.base_layer)
        out.append({k[len(p):]: flat_bytes(full(v)) for k, v in sd.items() if k.startswith(p)})
    return {"entries": out}


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise LookupError("the base layer is not in the wrapped model's module tree")


def train_stage(model: nn.Module, layers: list[nn.Module], x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach().cpu().clone(),
                                                                            out.detach().cpu().clone())))
             for layer in layers]
    params = stack.adapter_tensors(layers)
    opt = torch.optim.SGD(list(params.values()), lr=LR, foreach=False)
    rec: dict[str, Any] = {"params": {k: full(p) for k, p in params.items()}}
    opt.zero_grad(set_to_none=True)
    try:
        stack.loss_of(model(x), t).backward()
    finally:
        for h in hooks:
            h.remove()
    rec["io"] = seen
    rec["grads"] = {k: (full(p.grad) if p.grad is not None else None) for k, p in params.items()}
    opt.step()
    rec["final"] = {k: full(p) for k, p in params.items()}
    return rec


def state_dict_stage(model: nn.Module, layers: list[nn.Module], fresh: tuple[nn.Module, list[nn.Module]],
                     ckpt: str, group: Any) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    keys = adapter_state_keys(model, layers)
    sd = model.state_dict()
    saved = {k: sd[k] for k in keys.values() if k is not None}
    rec: dict[str, Any] = {"missing": sorted(n for n, k in keys.items() if k is None),
                           "sharded": sorted(k for k, v in saved.items() if is_dtensor(v)),
                           "saved": {n: full(t) for n, t in stack.adapter_tensors(layers).items()}}
    dcp.save(saved, checkpoint_id=ckpt, process_group=group)
    fmodel, flayers = fresh
    rec["fresh"] = {n: full(t) for n, t in stack.adapter_tensors(flayers).items()}
    fsd = fmodel.state_dict()
    target = {k: fsd[k] for k in saved if k in fsd}
    dcp.load(target, checkpoint_id=ckpt, process_group=group)
    fmodel.load_state_dict(target, strict=False)
    rec["loaded"] = {n: full(t) for n, t in stack.adapter_tensors(flayers).items()}
    return rec


def merge_layers(model: nn.Module, layers: list[nn.Module]) -> dict[str, Any]:
    """``merge()`` of every adapter layer: the adapter tensors merged (gathered first), then per layer the merged
    base (``base_record``) or the exception merge raised."""
    rec: dict[str, Any] = {"adapters": {n: full(t) for n, t in stack.adapter_tensors(layers).items()}, "layers": []}
    for layer in layers:
        try:
            layer.merge()
        except Exception as exc:  # noqa: BLE001 - a refusal is an outcome the parent judges
            rec["layers"].append(f"{type(exc).__name__}: {exc}")
            continue
        rec["layers"].append(base_record(layer.base_layer))
    return rec


def merge_stage(model: nn.Module, layers: list[nn.Module], fresh: tuple[nn.Module, list[nn.Module]]
                ) -> dict[str, Any]:
    rec = {"sharded": merge_layers(*fresh)}
    for m in fsdp_modules(model):
        m.unshard()
    rec["unsharded"] = merge_layers(model, layers)
    return rec


def _stage(fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | str:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - saved and reported by the parent as the stage's failure
        return f"{type(exc).__name__}: {exc}"


def run_case(rank: int, world: int, mesh: Any, group: Any, impl: Any, case: Case, seed: int, device: str, ckpt: str
             ) -> dict[str, Any]:
    method, _bits, storage = case
    base = base_of(case[1], storage)
    x, t = batch(seed, world, device)
    mine = rows(rank)
    model, layers = settled_stack(impl, method, base, seed, device, x[mine])
    fresh = settled_stack(impl, method, base, seed, device, x[mine], adapter_seed=seed + FRESH_ADAPTER_SEED)
    original = [unwrapped_record(layer.base_layer) | {"shard": flat_bytes(torch.chunk(layer.base_layer.weight.data,
                                                                                       world, dim=0)[rank])}
                for layer in layers]
    try:
        wrap(model, layers, mesh)
        wrap(fresh[0], fresh[1], mesh)
    except Exception as exc:  # noqa: BLE001 - fully_shard refused: judged by the parent (8-bit: may be expected)
        return {"wrap_error": f"{type(exc).__name__}: {exc}"}
    return {
        "original": original,
        "base": _stage(lambda: base_stage(model, layers)),
        "base_state_dict": _stage(lambda: base_state_dict_stage(model, layers)),
        "train": _stage(lambda: train_stage(model, layers, x[mine], t[mine])),
        "state_dict": _stage(lambda: state_dict_stage(model, layers, fresh, ckpt, group)),
        "merge": _stage(lambda: merge_stage(model, layers, fresh)),
    }


def case_name(world: int, case: Case) -> str:
    method, bits, storage = case
    return f"w{world}-{method}{bits}-{storage}"


def case_file(out_dir: str, world: int, case: Case, rank: int) -> Path:
    """Where rank ``rank`` saves its record of ``case`` at world size ``world``."""
    return Path(out_dir) / f"{case_name(world, case)}.rank{rank}.pt"


def rank_main(rank: int, worlds: tuple[int, ...], port: int, backend: str, device: str, impl: Any, cases: list[Case],
              seed: int, out_dir: str) -> None:
    """One rank of a process group of ``max(worlds)`` ranks: for each world size ``w``, the ranks below ``w`` run every
    case in a subgroup of their own (a 1-D device mesh over it). Every subgroup is made first (by every rank, in the
    same order), then the world sizes run largest first, so a rank never waits for cases it takes no part in: rank 1
    is done when the 2-rank cases are, while rank 0 goes on alone."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=max(worlds), timeout=timedelta(seconds=PG_TIMEOUT_S))
    impl = stack.rank_impl(impl)
    try:
        groups = {world: dist.new_group(list(range(world))) for world in worlds}
        for world in sorted(worlds, reverse=True):
            if rank >= world:
                continue
            group = groups[world]
            mesh = DeviceMesh.from_group(group, device.split(":")[0])
            for case in cases:
                ckpt = str(Path(out_dir) / f"{case_name(world, case)}.checkpoint")
                try:
                    rec: Any = run_case(rank, world, mesh, group, impl, case, seed, device, ckpt)
                except Exception as exc:  # noqa: BLE001 - saved and reported by the parent as the case's failure
                    rec = f"{type(exc).__name__}: {exc}"
                torch.save(rec, case_file(out_dir, world, case, rank))
                dist.barrier(group=group)
    finally:
        dist.destroy_process_group()


def spawn_worlds(impl: Any, worlds: tuple[int, ...], cases: list[Case], seed: int, device: str
                 ) -> dict[int, dict[Case, Any]]:
    """Every case at every world size, on ``max(worlds)`` spawned ranks; per world size and case, the ranks' records
    (or an error string)."""
    import torch.multiprocessing as mp

    backend = "nccl" if device.startswith("cuda") else "gloo"
    with tempfile.TemporaryDirectory(prefix="conformance-fsdp-") as out:
        # the ranks inherit the environment: one thread each (torch.set_num_threads covers torch; OpenMP reads this)
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            mp.spawn(rank_main, args=(worlds, stack.free_port(), backend, device, impl, cases, seed, out),
                     nprocs=max(worlds), join=True, start_method="spawn")
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        got: dict[int, dict[Case, Any]] = {}
        for world in worlds:
            got[world] = {}
            for case in cases:
                recs = [torch.load(case_file(out, world, case, r), weights_only=False) for r in range(world)]
                errs = [r for r in recs if isinstance(r, str)]
                got[world][case] = f"rank raised {errs[0]}" if errs else recs
        return got
