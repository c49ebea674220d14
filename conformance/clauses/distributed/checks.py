"""Checks of area ``distributed``: adapter layers under DistributedDataParallel (2 ranks).

The stack, its loss and how the implementation reaches the ranks are shared with the FSDP2 clauses
(``conformance.clauses.distributed.stack``); this module also binds those clauses' checks
(``fsdp_checks``), the area's second checks module.

One process group per implementation, device and seed: the first case family to run spawns the two
ranks for every (method, bits) family the implementation covers and the results are kept in
``_RUNS``, so the other families only compare (one gloo group per clause run, not four).

What each rank does (``_rank_main``): build the same 2-layer stack of adapter layers over quantized
bases (``make_base_layer`` with fixed seeds; the adapter through ``impl.create`` under
``torch.manual_seed(seed)``, the implementation's entry), snapshot the base bytes after one no-grad
forward (bitsandbytes casts a base bias to the input dtype on the first forward, by design), wrap it in
``DistributedDataParallel``, run ``STEPS`` SGD steps on its half of a fixed batch and save, per step,
the adapter parameters before the step and their gradients, then the final parameters and the base
bytes. The parent compares bit for bit across ranks and against a single-process run.

Bound (single process on the concatenated batch vs DDP, at the *same* parameters each step, so rounding
differences never compound through the steps). Loss ``L = (1/N) sum_s l_s`` with ``l_s`` the squared
error of sample ``s``; each gradient entry is ``(1/N) sum_s d_s`` where ``d_s`` (the per-sample
gradient entry) is, for an adapter weight, a product of two per-sample vectors (upstream gradient and
layer input); for DoRA's magnitude ``m_j`` it is the upstream gradient times ``((W0 + s B A) x_s)_j / n_j``, again a
per-sample product (the norm ``n`` depends on the parameters only, the same in both runs). DDP sums each half in a
rank (mean over N/2), all-reduces and divides by the world size;
the single process sums all N at once. Each float32 evaluation has error at most
``gamma_n(u32) * (1/N) sum_s |d_s|`` with ``n`` the accumulations on the longest path (the N batch
rows, the inner dimensions in + hidden + out, the adapter rank or OFT block size (DoRA: the rank plus the values its
rescaling stores, ``INNER``), and 3 for the scaling
by 1/N, the all-reduce sum of two ranks and the division by the world size; the same accumulation
model as ``conformance.numerics.grads``), so the two differ by at most twice that. The magnitude
``sum_s |d_s|`` is computed from per-sample gradients (float32, summed in float64) on the stored
parameters: exact for LoRA's outer-product weight gradients; for OFT the gradient of ``oft_R`` is the
Cayley backward (the same parameters in both runs) applied to such a batch sum, its own rounding
counted by the block-size term of ``n``. Measured on the CPU (reference and PEFT 0.21.2): worst
ratio 0.014 (LoRA) to 0.057 (OFT), so the comparison is informative without a slack factor.
Parameters are then checked bit for bit: step k+1's equal ``p_k.add(g_k, alpha=-LR)`` of rank 0's
all-reduced gradient, the single-process SGD update.
"""

from __future__ import annotations

import math
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance.clauses.clause import check
from conformance.clauses.distributed import fsdp_checks  # noqa: F401 - binds the DIST-FSDP2-* checks
from conformance.clauses.distributed.stack import (
    DIMS,
    INNER,
    adapter_tensors,
    build_stack,
    differ,
    free_port,
    loss_of,
    portable,
    rank_impl,
)
from conformance.numerics import ratio as nratio
from conformance.numerics.rounding import gamma_n
from conformance.quant import layers as qlayers

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

WORLD = 2
BATCH = 8  # per step, split in halves over the ranks
STEPS = 3
LR = 0.01
PG_TIMEOUT_S = 120

#: (id(impl), device, seed) -> (impl, {(method, bits): rank records or an error string})
_RUNS: dict[tuple[int, str, int], tuple[Any, dict[tuple[str, int], Any]]] = {}


def base_bytes(layers: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": t for i, layer in enumerate(layers) for k, t in qlayers.snapshot(layer.base_layer).tensors.items()}


def batch(seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(STEPS, BATCH, DIMS[0], generator=gen)
    t = torch.randn(STEPS, BATCH, DIMS[-1], generator=gen)
    return x.to(device), t.to(device)


def _run_case(rank: int, impl: Any, method: str, bits: int, seed: int, device: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model, layers = build_stack(impl, method, bits, seed, device)
    x, t = batch(seed, device)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    with torch.no_grad():  # bitsandbytes casts a base bias to the input dtype on the first forward: settle it
        model(x[0, half])
    before = base_bytes(layers)
    ddp = DistributedDataParallel(model, device_ids=[rank] if device.startswith("cuda") else None)
    params = adapter_tensors(layers)
    opt = torch.optim.SGD(list(params.values()), lr=LR)
    rec: dict[str, Any] = {"params": [], "grads": []}
    for step in range(STEPS):
        rec["params"].append({k: p.detach().cpu().clone() for k, p in params.items()})
        opt.zero_grad(set_to_none=False)
        loss_of(ddp(x[step, half]), t[step, half]).backward()
        rec["grads"].append({k: (p.grad.detach().cpu().clone() if p.grad is not None else None)
                             for k, p in params.items()})
        opt.step()
    rec["final"] = {k: p.detach().cpu().clone() for k, p in params.items()}
    rec["base_before"], rec["base_after"] = before, base_bytes(layers)
    return rec


def _rank_main(rank: int, port: int, backend: str, device: str, impl: Any, cases: list[tuple[str, int]],
               seed: int, out_dir: str) -> None:
    """One rank: every case in one process group; an exception in a case is saved as its error."""
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S))
    impl = rank_impl(impl)
    try:
        for method, bits in cases:
            try:
                rec: Any = _run_case(rank, impl, method, bits, seed, device)
            except Exception as exc:  # noqa: BLE001 - saved and reported by the parent as the case's failure
                rec = f"{type(exc).__name__}: {exc}"
            torch.save(rec, Path(out_dir) / f"{method}{bits}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(impl: Any, cases: list[tuple[str, int]], seed: int, device: str) -> dict[tuple[str, int], Any]:
    """Run every case on ``WORLD`` spawned ranks; per case, the ranks' records (or an error string)."""
    import torch.multiprocessing as mp

    backend = "nccl" if device.startswith("cuda") else "gloo"
    with tempfile.TemporaryDirectory(prefix="conformance-ddp-") as out:
        mp.spawn(_rank_main, args=(free_port(), backend, device, impl, cases, seed, out), nprocs=WORLD,
                 join=True, start_method="spawn")
        got: dict[tuple[str, int], Any] = {}
        for method, bits in cases:
            recs = [torch.load(Path(out) / f"{method}{bits}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
            errs = [r for r in recs if isinstance(r, str)]
            got[(method, bits)] = f"rank raised {errs[0]}" if errs else recs
        return got


def _runs(ctx: CheckContext) -> dict[tuple[str, int], Any]:
    impl = ctx.impl
    key = (id(impl), ctx.device, ctx.seed)
    cached = _RUNS.get(key)
    if cached is not None and cached[0] is impl:
        return cached[1]
    sent = portable(impl)
    if isinstance(sent, str):
        ctx.skip(sent)
    if sent is not impl:
        ctx.note(f"the implementation object does not pickle; each rank builds {type(impl).__qualname__}()")
    cases = [(str(m), b) for m, b in ctx.applies.families]
    got = spawn_ranks(sent, cases, ctx.seed, ctx.device)
    _RUNS[key] = (impl, got)
    return got


def _single_process(ctx: CheckContext, method: str, bits: int, recs: list[dict[str, Any]]) -> None:
    """Each step's DDP gradient vs one process on the whole batch at the same parameters, and the SGD update."""
    model, layers = build_stack(ctx.impl, method, bits, ctx.seed, "cpu")
    ctx.layers_built += len(layers)
    params = adapter_tensors(layers)
    x, t = batch(ctx.seed, "cpu")
    n_acc = BATCH + sum(DIMS) + INNER[method] + 3
    gam = gamma_n(n_acc, torch.float32)
    for step in range(STEPS):
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(recs[0]["params"][step][k])
        model.zero_grad(set_to_none=True)
        loss_of(model(x[step]), t[step]).backward()
        full = {k: p.grad.detach().clone() for k, p in params.items()}
        mag = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        for s in range(BATCH):  # per-sample gradients: the magnitude of the batch sum's terms
            model.zero_grad(set_to_none=True)
            loss_of(model(x[step, s:s + 1]), t[step, s:s + 1]).backward()
            for k, p in params.items():
                mag[k] += p.grad.detach().double().abs() / BATCH
        for k in params:
            got = recs[0]["grads"][step][k]
            if got is None:
                ctx.fail(f"{method}/{bits}bit step {step}: no gradient reached {k} under DDP")
            r, where = nratio.compare(got, full[k].double(), 2 * gam * mag[k])
            ctx.bounded("grad_ratio", r, lambda r=r, where=where, k=k, step=step: (
                f"{method}/{bits}bit step {step}: DDP gradient of {k} vs single process on the whole batch: "
                f"ratio {r:.3g} ({where})"))
            nxt = recs[0]["final"] if step == STEPS - 1 else recs[0]["params"][step + 1]
            want = recs[0]["params"][step][k].add(got, alpha=-LR)
            if not torch.equal(nxt[k], want):
                ctx.fail(f"{method}/{bits}bit step {step}: {k} after the SGD step is not p - lr * grad of the "
                         f"all-reduced gradient (max |diff| {float((nxt[k] - want).abs().max()):.3g})")


@check("DIST-DDP-GRADS-AGREE")
def ddp_grads_agree(ctx: CheckContext) -> None:
    if ctx.device.startswith("cuda") and torch.cuda.device_count() < WORLD:
        ctx.skip(f"NCCL DDP needs {WORLD} GPUs, this machine has {torch.cuda.device_count()}")
    import torch.distributed as dist

    if not dist.is_available() or not (dist.is_nccl_available() if ctx.device.startswith("cuda")
                                       else dist.is_gloo_available()):
        ctx.skip("torch.distributed with the " + ("nccl" if ctx.device.startswith("cuda") else "gloo")
                 + " backend is not available in this torch build")
    cases = list(ctx.cases())
    runs = _runs(ctx)
    for method, bits in cases:
        recs = runs.get((method, bits))
        if recs is None:
            ctx.fail(f"{method}/{bits}bit: the ranks did not run this case")
        if isinstance(recs, str):
            ctx.fail(f"{method}/{bits}bit under DDP: {recs}")
        r0, r1 = recs
        for step in range(STEPS):
            for what in ("params", "grads"):
                bad = differ(r0[what][step], r1[what][step])
                ctx.check(not bad, f"{method}/{bits}bit step {step}: {what} differ between rank 0 and rank 1: "
                                   f"{', '.join(bad)}")
        bad = differ(r0["final"], r1["final"])
        ctx.check(not bad, f"{method}/{bits}bit: final adapter parameters differ between ranks: {', '.join(bad)}")
        for rank, rec in enumerate(recs):
            changed = differ(rec["base_before"], rec["base_after"])
            ctx.check(not changed, f"{method}/{bits}bit rank {rank}: base bytes changed by training: "
                                   f"{', '.join(changed)}")
        bad = differ(r0["base_after"], r1["base_after"])
        ctx.check(not bad, f"{method}/{bits}bit: base bytes differ between ranks: {', '.join(bad)}")
        moved = max(float((r0["final"][k] - r0["params"][0][k]).abs().max()) for k in r0["final"])
        ctx.check(moved > 0 and math.isfinite(moved), f"{method}/{bits}bit: the adapter did not train "
                                                      f"(max parameter change {moved})")
        _single_process(ctx, method, bits, recs)
