"""Checks of the DIST-FSDP2-* clauses: adapter layers on quantized bases under torch's FSDP2 (``fully_shard``).

The ranks' work is ``conformance.clauses.distributed.fsdp`` (one process group per world size, every case of every
family; the records kept in ``_RUNS``, so the five clauses share one run per implementation, device and seed). Each
check walks the same cases: per family (method, bits), every world size (``fsdp.world_sizes``: 1 and 2 ranks on gloo;
1 and every GPU on NCCL, skipped below 2 GPUs) and every base of ``fsdp.BASES`` (4-bit: each ``quant_storage``), one
``ctx.case`` each. The parent builds the never-wrapped twin of each stack (same seeds) and compares.

A wrap that ``fully_shard`` refuses (an exception at wrap time) is the expected outcome for an 8-bit base, with a note
(FSDP2 is not promised for int8 payloads); for a 4-bit base it is a failure.

Bounds. The forward: each wrapped adapter layer's output, on the input it got, against the never-wrapped layer's
output on that same input, within twice the layer's forward bound (``numerics.methods.layer_expected``: each of the
two is within its bound of the float64 oracle; FSDP2 gathers the same bytes, so in practice they agree exactly). The
gradients: as DIST-DDP-GRADS-AGREE (``checks`` module docstring), one step, ``N = ROWS_PER_RANK * W`` rows: the sum over
N samples, the inner dimensions, the adapter's own length (``checks.INNER``), then the 1/N scaling, FSDP's division by
the world size before and after the reduction and the ``W - 1`` additions of the reduce-scatter: ``n = N + sum(DIMS) +
INNER + W + 2`` accumulations of float32 on the longest path, each gradient within ``2 gamma_n sum_s |d_s| / N`` of a
single process on the whole batch. Everything else (payload, quant state, state dict, merge) is compared bit for bit:
nothing there rounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance.clauses.cases import BaseCase
from conformance.clauses.clause import check
from conformance.clauses.distributed import fsdp, stack
from conformance.core import upstream
from conformance.numerics import ratio as nratio
from conformance.numerics.methods import layer_expected
from conformance.numerics.rounding import gamma_n

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: (id(impl), device, seed) -> (impl, {world size: {case: rank records or an error string}})
_RUNS: dict[tuple[int, str, int], tuple[Any, dict[int, dict[fsdp.Case, Any]]]] = {}
#: the clauses this module checks (they share one spawned run per implementation object)
CLAUSES = ("DIST-FSDP2-BASE-KEPT", "DIST-FSDP2-FORWARD", "DIST-FSDP2-GRADS-AGREE", "DIST-FSDP2-STATE-DICT",
           "DIST-FSDP2-MERGE")
#: words that make an exception raised by merge() of a sharded layer a clear refusal: it names the sharding
CLEAR_REFUSAL = ("shard", "dtensor", "fsdp")


@dataclass(frozen=True)
class FsdpCase:
    """One case of a family: its world size, base and the ranks' records (a list, one per rank, or an error string)."""

    method: str
    bits: int
    world: int
    base: BaseCase
    recs: Any

    @property
    def storage(self) -> str:
        return fsdp.storage_label(self.base)

    @property
    def label(self) -> str:
        return f"{self.method}/{self.bits}bit {self.storage} world {self.world}"


def _preflight(ctx: CheckContext) -> None:
    if ctx.device.startswith("cuda") and torch.cuda.device_count() < 2:
        ctx.skip(f"FSDP2 on NCCL needs 2 or more GPUs (world size 2 and up), this machine has "
                 f"{torch.cuda.device_count()}")
    import torch.distributed as dist

    backend = "nccl" if ctx.device.startswith("cuda") else "gloo"
    if not dist.is_available() or not (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()):
        ctx.skip(f"torch.distributed with the {backend} backend is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        ctx.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {exc}")


def _runs(ctx: CheckContext) -> dict[int, dict[fsdp.Case, Any]]:
    impl = ctx.impl
    key = (id(impl), ctx.device, ctx.seed)
    cached = _RUNS.get(key)
    if cached is not None and cached[0] is impl:
        return cached[1]
    sent = stack.portable(impl)
    if isinstance(sent, str):
        ctx.skip(sent)
    if sent is not impl:
        ctx.note(f"the implementation object does not pickle; each rank builds {type(impl).__qualname__}()")
    cases = [(str(m), b, fsdp.storage_label(base)) for m, b in ctx.applies.families for base in fsdp.BASES[b]]
    got = fsdp.spawn_worlds(sent, fsdp.world_sizes(ctx.device), cases, ctx.seed, ctx.device)
    _RUNS[key] = (impl, got)
    return got


def each_case(ctx: CheckContext) -> Iterator[FsdpCase]:
    _preflight(ctx)
    families = list(ctx.cases())
    runs = _runs(ctx)
    for method, bits in families:
        for world, got in runs.items():
            for base in fsdp.BASES[bits]:
                yield FsdpCase(method, bits, world, base, got.get((method, bits, fsdp.storage_label(base))))


def stage_records(ctx: CheckContext, c: FsdpCase, stage: str) -> list[dict[str, Any]] | None:
    """The ranks' records of ``stage``; None when ``fully_shard`` refused an 8-bit base at wrap time (the expected
    outcome, noted). Fails the case when a rank raised or fully_shard refused a 4-bit base."""
    if c.recs is None:
        ctx.fail(f"{c.label}: the ranks did not run this case")
    if isinstance(c.recs, str):
        ctx.fail(f"{c.label}: {c.recs}")
    refused = c.recs[0].get("wrap_error")
    if refused is not None:
        if c.bits == 8:
            ctx.note(f"{c.label}: fully_shard refused the 8-bit base at wrap time ({refused}): the expected outcome")
            ctx.measure("fsdp2_refused_8bit", True)
            return None
        ctx.fail(f"{c.label}: fully_shard raised at wrap time: {refused}")
    out = []
    for rank, rec in enumerate(c.recs):
        got = rec[stage]
        if isinstance(got, str):
            ctx.fail(f"{c.label} rank {rank}: {stage} raised {got}")
        out.append(got)
    return out


def twin_stack(ctx: CheckContext, c: FsdpCase) -> tuple[nn.Module, list[nn.Module]]:
    """The never-wrapped stack of the case (rank 0's settling rows; the payload does not depend on them)."""
    x, _ = fsdp.batch(ctx.seed, c.world, "cpu")
    model, layers = fsdp.settled_stack(ctx.impl, c.method, c.base, ctx.seed, "cpu", x[fsdp.rows(0)])
    ctx.layers_built += len(layers)
    return model, layers


# -- DIST-FSDP2-BASE-KEPT ----------------------------------------------------------------------------------------

def _judge_payload(ctx: CheckContext, c: FsdpCase, recs: list[dict[str, Any]]) -> None:
    """Each rank's shard, the payload gathered and the quant state, as wrapped and after ``unshard()``, against the
    base layers before wrapping."""
    for rank, rec in enumerate(recs):
        for i, want in enumerate(c.recs[rank]["original"]):
            where = f"{c.label} rank {rank} layer {i}"
            wrapped, unsharded = rec["wrapped"][i], rec["unsharded"][i]
            ctx.check(torch.equal(wrapped["local"], want["shard"]),
                      f"{where}: the rank's shard of the wrapped payload is not its part of the original bytes")
            ctx.check(torch.equal(wrapped["payload"], want["payload"]),
                      f"{where}: the wrapped payload, gathered, differs from the original bytes")
            bad = stack.differ(wrapped["quant_state"], want["quant_state"])
            ctx.check(not bad, f"{where}: wrapping lost or changed the quant state where bitsandbytes looks for it: "
                               f"{', '.join(bad)}")
            ctx.check(torch.equal(unsharded["payload"], want["payload"]),
                      f"{where}: after unshard() the payload differs from the original bytes")
            bad = stack.differ(unsharded["quant_state"], want["quant_state"])
            ctx.check(not bad, f"{where}: after unshard() the quant state where bitsandbytes looks for it is lost or "
                               f"changed: {', '.join(bad)}")
            if unsharded["missing_attrs"]:
                ctx.fail(f"{where}: after unshard() the weight FSDP2 puts in the module ({unsharded['weight_type']}) "
                         f"has no attribute {unsharded['missing_attrs'][0]!r} (bitsandbytes 0.50.2 "
                         "Linear8bitLt.forward reads weight.CB, and SCB beside it)")


def _judge_state_dict(ctx: CheckContext, c: FsdpCase, recs: list[dict[str, Any]]) -> None:
    """Each base layer's entries of the wrapped model's state dict against the layer's own before wrapping."""
    for rank, rec in enumerate(recs):
        for i, original in enumerate(c.recs[rank]["original"]):
            where = f"{c.label} rank {rank} layer {i}"
            want, entries = original["state_dict"], rec["entries"][i]
            lost = sorted(set(want) - set(entries))
            ctx.check(not lost, f"{where}: the full state dict lacks the quant state entries the unwrapped layer saves "
                                f"({', '.join(lost)}): a checkpoint of the wrapped model cannot be read back quantized")
            bad = stack.differ({k: entries[k] for k in want}, want)
            ctx.check(not bad, f"{where}: the full state dict's entries differ from the unwrapped layer's: "
                               f"{', '.join(bad)}")


@check("DIST-FSDP2-BASE-KEPT")
def fsdp2_base_kept(ctx: CheckContext) -> None:
    for c in each_case(ctx):
        known = ctx.known_upstream(upstream.FSDP2_STATE_DICT_QUANT_STATE if c.bits == 4
                                   else upstream.FSDP2_INT8_WEIGHT_ATTRS)
        with ctx.case(c.label, known=known):
            recs = stage_records(ctx, c, "base")
            if recs is None:
                continue
            _judge_payload(ctx, c, recs)  # first: a lost quant state in the state dict is a listed failure
            _judge_state_dict(ctx, c, stage_records(ctx, c, "base_state_dict") or [])


# -- DIST-FSDP2-FORWARD --------------------------------------------------------------------------------------

@check("DIST-FSDP2-FORWARD")
def fsdp2_forward(ctx: CheckContext) -> None:
    for c in each_case(ctx):
        known = ctx.known_upstream(upstream.FSDP2_INT8_WEIGHT_ATTRS) if c.bits == 8 else None
        with ctx.case(c.label, known=known):
            recs = stage_records(ctx, c, "train")
            if recs is None:
                continue
            _, twin = twin_stack(ctx, c)
            params = stack.ADAPTERS[c.method].params
            for rank, rec in enumerate(recs):
                ctx.check(len(rec["io"]) == len(twin), f"{c.label} rank {rank}: {len(rec['io'])} adapter layer "
                                                       f"forwards recorded, the stack has {len(twin)}")
                for i, ((x, y), layer) in enumerate(zip(rec["io"], twin)):
                    with torch.no_grad():
                        want = layer(x)
                    e = layer_expected(layer, c.method, "default", params, x, training=True)
                    r, where = nratio.compare(y, want.double(), 2 * e.bound)
                    ctx.bounded("forward_ratio", r, lambda r=r, where=where, i=i, rank=rank, c=c: (
                        f"{c.label} rank {rank} layer {i}: the wrapped layer's output vs the unwrapped layer's on the "
                        f"same input: ratio {r:.3g} to twice its forward bound ({where})"))


# -- DIST-FSDP2-GRADS-AGREE ----------------------------------------------------------------------------------

def _single_process(ctx: CheckContext, c: FsdpCase, rec: dict[str, Any]) -> None:
    """The gradient of one process on the whole batch at the same parameters, within the accumulation bound, and
    the SGD update."""
    model, layers = twin_stack(ctx, c)
    params = stack.adapter_tensors(layers)
    x, t = fsdp.batch(ctx.seed, c.world, "cpu")
    n = x.shape[0]
    gam = gamma_n(n + sum(stack.DIMS) + stack.INNER[c.method] + c.world + 2, torch.float32)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(rec["params"][k])
    model.zero_grad(set_to_none=True)
    stack.loss_of(model(x), t).backward()
    whole = {k: p.grad.detach().clone() for k, p in params.items()}
    mag = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for s in range(n):
        model.zero_grad(set_to_none=True)
        stack.loss_of(model(x[s:s + 1]), t[s:s + 1]).backward()
        for k, p in params.items():
            mag[k] += p.grad.detach().double().abs() / n
    for k in params:
        got = rec["grads"][k]
        if got is None:
            ctx.fail(f"{c.label}: no gradient reached {k} under FSDP2")
        r, where = nratio.compare(got, whole[k].double(), 2 * gam * mag[k])
        ctx.bounded("grad_ratio", r, lambda r=r, where=where, k=k: (
            f"{c.label}: FSDP2 gradient of {k} vs single process on the whole batch: ratio {r:.3g} ({where})"))
        want = rec["params"][k].add(got, alpha=-fsdp.LR)
        ctx.check(torch.equal(rec["final"][k], want), f"{c.label}: {k} after the SGD step is not p - lr * grad of the "
                                                      "reduced gradient")


@check("DIST-FSDP2-GRADS-AGREE")
def fsdp2_grads_agree(ctx: CheckContext) -> None:
    for c in each_case(ctx):
        known = ctx.known_upstream(upstream.FSDP2_INT8_WEIGHT_ATTRS) if c.bits == 8 else None
        with ctx.case(c.label, known=known):
            recs = stage_records(ctx, c, "train")
            if recs is None:
                continue
            for rank, rec in enumerate(recs[1:], start=1):
                for what in ("params", "grads", "final"):
                    bad = stack.differ(recs[0][what], rec[what])
                    ctx.check(not bad, f"{c.label}: {what} differ between rank 0 and rank {rank}: {', '.join(bad)}")
            _single_process(ctx, c, recs[0])


# -- DIST-FSDP2-STATE-DICT -----------------------------------------------------------------------------------

@check("DIST-FSDP2-STATE-DICT")
def fsdp2_state_dict(ctx: CheckContext) -> None:
    for c in each_case(ctx):
        with ctx.case(c.label):
            recs = stage_records(ctx, c, "state_dict")
            if recs is None:
                continue
            for rank, rec in enumerate(recs):
                where = f"{c.label} rank {rank}"
                ctx.check(not rec["missing"], f"{where}: adapter tensors not in the wrapped model's state dict (outside "
                                              f"its module tree, so never sharded nor saved): {', '.join(rec['missing'])}")
                bad = stack.differ(rec["saved"], rec["loaded"])
                ctx.check(not bad, f"{where}: the adapters loaded from the sharded checkpoint differ from those saved: "
                                   f"{', '.join(bad)}")
                bad = stack.differ(recs[0]["saved"], rec["saved"])
                ctx.check(not bad, f"{where}: the adapters saved differ from rank 0's: {', '.join(bad)}")
                ctx.measure_max("adapters_changed_by_load", len(stack.differ(rec["fresh"], rec["loaded"])))


# -- DIST-FSDP2-MERGE ----------------------------------------------------------------------------------------

def _twin_merged(ctx: CheckContext, c: FsdpCase, adapters: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The never-wrapped stack with ``adapters`` put in, merged: each base's record."""
    _, layers = twin_stack(ctx, c)
    with torch.no_grad():
        for k, p in stack.adapter_tensors(layers).items():
            p.copy_(adapters[k])
    for layer in layers:
        layer.merge()
    return [fsdp.base_record(layer.base_layer) for layer in layers]


def _same_merge(ctx: CheckContext, where: str, got: dict[str, Any], want: dict[str, Any]) -> None:
    bad = [k for k in ("payload", "bias") if k in want and not torch.equal(got.get(k, torch.empty(0)), want[k])]
    bad += stack.differ(got["quant_state"], want["quant_state"])
    ctx.check(not bad, f"{where}: the merged base differs from the same merge on the never-wrapped model: "
                       f"{', '.join(bad)}")


@check("DIST-FSDP2-MERGE")
def fsdp2_merge(ctx: CheckContext) -> None:
    refusals: set[str] = set()
    for c in each_case(ctx):
        with ctx.case(c.label):
            recs = stage_records(ctx, c, "merge")
            if recs is None:
                continue
            for variant in ("sharded", "unsharded"):
                merged = any(not isinstance(got, str) for rec in recs for got in rec[variant]["layers"])
                want = _twin_merged(ctx, c, recs[0][variant]["adapters"]) if merged else []
                for rank, rec in enumerate(recs):
                    for i, got in enumerate(rec[variant]["layers"]):
                        where = f"{c.label} rank {rank} layer {i}, merged {variant}"
                        if isinstance(got, str):
                            clear = variant == "sharded" and any(w in got.lower() for w in CLEAR_REFUSAL)
                            ctx.check(clear, f"{where}: merge() raised {got}" + (
                                " (not a refusal that names the sharding)" if variant == "sharded" else ""))
                            refusals.add(got)
                            continue
                        _same_merge(ctx, where, got, want[i])
    for text in sorted(refusals):
        ctx.note(f"merge() of a sharded layer refused: {text}")
