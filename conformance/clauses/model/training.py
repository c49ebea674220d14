"""Model clauses of the QLoRA training path: the entry's ``prepare`` (PEFT: ``prepare_model_for_kbit_training``),
gradient checkpointing and the first optimizer steps, on both load paths.

Each case is one (method, bits) family on one load path, from a freshly loaded model in train mode. The adapter is
perturbed away from its init (LoRA's B starts at zero, so A would get no gradient). The loss is the causal LM loss
of the model on a fixed batch (``labels = input_ids``).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch

from conformance.clauses.clause import check
from conformance.clauses.model import cases as mcases
from conformance.clauses.model.steps import NAME, changed, snapshots, spec, step, walk
from conformance.clauses.twin import cases as tcases

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: the checkpointing settings of the clauses: None (off), reentrant, non-reentrant
CHECKPOINTING: dict[str, dict[str, Any] | None] = {
    "off": None, "reentrant": {"use_reentrant": True}, "non-reentrant": {"use_reentrant": False},
}
STEPS = 3
LEARNING_RATE = 1e-2


class Memory:
    """Memory taken by a step: the growth of the process's resident set (``/proc/self/statm``; the CPU allocator keeps
    what it took, so this is what the step left resident, not a peak), and on CUDA the peak allocated during it."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def _rss_mib() -> float:
        try:
            pages = int(open("/proc/self/statm").read().split()[1])
        except (OSError, ValueError, IndexError):
            return float("nan")
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> Memory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = self._rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_growth_mib = self._rss_mib() - self.start
        self.cuda_peak_mib = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def report(self, ctx: CheckContext, what: str) -> None:
        if math.isfinite(self.rss_growth_mib):
            ctx.measure_max(f"{what}_rss_growth_mib", round(self.rss_growth_mib, 2))
        if self.cuda_peak_mib is not None:
            ctx.measure_max(f"{what}_cuda_peak_mib", round(self.cuda_peak_mib, 2))


def _prepared(ctx: CheckContext, method: str, bits: int, path: str, label: str, checkpointing: str
              ) -> tuple[Any, torch.nn.Module, dict[str, torch.Tensor]]:
    """(entry, prepared and adapted model in train mode, its adapter tensors by ``<module>.<tensor>``), the adapter
    perturbed with the same seed whatever the checkpointing, so runs are comparable."""
    entry = ctx.impl.model
    model = step(ctx, label, "loading the model", lambda: mcases.load(path, bits, ctx.seed, ctx.device))
    prepared = step(ctx, label, f"prepare (checkpointing {checkpointing})",
                    lambda: entry.prepare(model, CHECKPOINTING[checkpointing]))
    torch.manual_seed(ctx.seed)  # the adapter's random init (LoRA's A) is the same in every run compared
    adapted = step(ctx, label, "attach", lambda: entry.attach(prepared, mcases.TARGETS, spec(method)))
    layers = step(ctx, label, "adapter_layers", lambda: entry.adapter_layers(adapted))
    gen = ctx.generator(offset=21)
    for _, layer in sorted(layers.items()):
        tcases.perturb(layer, gen)
    tensors = {f"{n}.{k}": t for n, layer in sorted(layers.items())
               for k, t in layer.adapter_parameters(NAME).items() if t.is_floating_point()}
    adapted.train()
    return entry, adapted, tensors


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _grads(ctx: CheckContext, label: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor],
           ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor | None]]:
    for t in tensors.values():
        t.grad = None
    loss = step(ctx, label, "the forward (train mode)", lambda: _loss(model, ids))
    step(ctx, label, "backward", loss.backward)
    return float(loss), {k: None if t.grad is None else t.grad.detach().clone() for k, t in tensors.items()}


@check("MODEL-PREPARE")
def check_prepare(ctx: CheckContext) -> None:
    for method, bits, path, label in walk(ctx):
        with ctx.case(label):
            entry = ctx.impl.model
            model = step(ctx, label, "loading the model", lambda: mcases.load(path, bits, ctx.seed, ctx.device))
            before = snapshots(model)
            with Memory(ctx.device) as memory:
                prepared = step(ctx, label, "prepare", lambda: entry.prepare(model, CHECKPOINTING["non-reentrant"]))
            memory.report(ctx, "prepare")
            moved = changed(before, prepared)
            ctx.check(not moved, f"{label}: prepare changed the quantized base of {len(moved)} layer(s), e.g. "
                                 f"{next(iter(moved.items()), None)}")
            adapted = step(ctx, label, "attach", lambda: entry.attach(prepared, mcases.TARGETS, spec(method)))
            owned = {id(t) for layer in entry.adapter_layers(adapted).values()
                     for t in layer.adapter_parameters(NAME).values() if t.is_floating_point()}
            trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
            adapter = {n for n, p in adapted.named_parameters() if id(p) in owned}
            extra, frozen = sorted(trainable - adapter), sorted(adapter - trainable)
            ctx.check(not extra, f"{label}: {len(extra)} base parameter(s) trainable after prepare and attach, e.g. "
                                 f"{extra[:3]}")
            ctx.check(not frozen, f"{label}: {len(frozen)} adapter tensor(s) not trainable, e.g. {frozen[:3]}")
            dtypes: dict[str, int] = {}
            for _, p in adapted.named_parameters():
                key = str(p.dtype).removeprefix("torch.")
                dtypes[key] = dtypes.get(key, 0) + 1
            ctx.measure(f"parameter_dtypes.{method}.{bits}bit.{path}", dict(sorted(dtypes.items())))


@check("MODEL-GRAD-CHECKPOINT")
def check_grad_checkpoint(ctx: CheckContext) -> None:
    for method, bits, path, label in walk(ctx):
        ids = mcases.input_ids(ctx.device, ctx.seed)
        _, plain, tensors = _prepared(ctx, method, bits, path, label, "off")
        _, want = _grads(ctx, label, plain, tensors, ids)
        for mode in ("reentrant", "non-reentrant"):
            case = f"{label}, {mode} checkpointing"
            with ctx.case(case):
                _, model, tensors = _prepared(ctx, method, bits, path, case, mode)
                _, got = _grads(ctx, case, model, tensors, ids)
                missing = sorted(k for k, g in got.items() if g is None)
                ctx.check(not missing, f"{case}: {len(missing)} of {len(got)} adapter tensors got no gradient, e.g. "
                                       f"{missing[:3]}")
                diff = max((float((got[k].double() - want[k].double()).abs().max()) for k in got
                            if got[k] is not None and want.get(k) is not None), default=0.0)
                ctx.measure_max(f"max_grad_diff.{method}.{mode}", diff)
                same = [k for k in got if got[k] is not None and want.get(k) is not None
                        and torch.equal(got[k], want[k])]
                ctx.check(len(same) == len(got), f"{case}: {len(got) - len(same)} of {len(got)} adapter gradients "
                                                 f"differ from those without checkpointing (max |diff| {diff:.3g})")


@check("MODEL-FIRST-STEPS")
def check_first_steps(ctx: CheckContext) -> None:
    for method, bits, path, label in walk(ctx):
        with ctx.case(label):
            ids = mcases.input_ids(ctx.device, ctx.seed)
            _, model, tensors = _prepared(ctx, method, bits, path, label, "non-reentrant")
            before = snapshots(model)
            start = {k: t.detach().clone() for k, t in tensors.items()}
            opt = torch.optim.SGD(list(tensors.values()), lr=LEARNING_RATE)
            for i in range(STEPS):
                with Memory(ctx.device) as memory:
                    loss, grads = _grads(ctx, label, model, tensors, ids)
                if i == 0:
                    memory.report(ctx, "first_step")
                ctx.check(math.isfinite(loss), f"{label}: loss {loss} at step {i}")
                bad = sorted(k for k, g in grads.items() if g is None or not bool(torch.isfinite(g).all()))
                ctx.check(not bad, f"{label}: step {i}: {len(bad)} adapter tensor(s) without a finite gradient, e.g. "
                                   f"{bad[:3]}")
                norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values() if g is not None))
                ctx.check(norm > 0, f"{label}: step {i}: every adapter gradient is zero")
                opt.step()
            moved = [k for k, t in tensors.items() if torch.equal(t.detach(), start[k])]
            ctx.check(len(moved) < len(tensors), f"{label}: {STEPS} steps changed no adapter tensor")
            rewritten = changed(before, model)
            ctx.check(not rewritten, f"{label}: training changed the quantized base of {len(rewritten)} layer(s), "
                                     f"e.g. {next(iter(rewritten.items()), None)}")
            ctx.measure_max(f"final_loss.{method}.{bits}bit", loss)
