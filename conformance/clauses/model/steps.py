"""What the model checks share: the adapter's name, a step that names itself when it raises, the cases, a fresh adapted
model with its adapter perturbed away from its init, and the bytes of every bitsandbytes layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from conformance import tinymodels
from conformance.clauses.interface import AdapterSpec
from conformance.clauses.model import cases as mcases
from conformance.clauses.observe import recorded_warnings
from conformance.clauses.twin import cases as tcases
from conformance.quant import layers as qlayers

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

NAME = "default"
#: parameter names that only an adapter has (what "no adapter tensor left" looks for after an unload)
ADAPTER_KEYS = ("lora_", "oft_", "magnitude_vector")


def step(ctx: CheckContext, label: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        with recorded_warnings():
            return fn()
    except Exception as exc:  # noqa: BLE001 - a step that raises fails the clause, named
        ctx.fail(f"{label}: {what} raised {type(exc).__name__}: {exc}")


def walk(ctx: CheckContext) -> Iterator[tuple[str, int, str, str]]:
    for method, bits in ctx.cases():
        for path in mcases.LOAD_PATHS:
            yield method, bits, path, f"{method}/{bits}bit, {path}"


def spec(method: str) -> AdapterSpec:
    return AdapterSpec(method, NAME, mcases.params(method))


def adapted_model(ctx: CheckContext, method: str, bits: int, path: str, label: str
             ) -> tuple[Any, torch.nn.Module, dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]:
    """(entry, adapted model, its adapter layers, the input ids, the adapted logits): the adapter attached and
    perturbed away from its init."""
    entry = ctx.impl.model
    model = step(ctx, label, "loading the model", lambda: mcases.load(path, bits, ctx.seed, ctx.device))
    adapted = step(ctx, label, "attach", lambda: entry.attach(model, mcases.TARGETS, spec(method)))
    layers = step(ctx, label, "adapter_layers", lambda: entry.adapter_layers(adapted))
    gen = ctx.generator(offset=11)
    for _, layer in sorted(layers.items()):
        tcases.perturb(layer, gen)
    ids = mcases.input_ids(ctx.device, ctx.seed)
    y = step(ctx, label, "the adapted forward", lambda: mcases.logits(adapted, ids))
    return entry, adapted, layers, ids, y


def snapshots(model: torch.nn.Module) -> dict[str, qlayers.LayerSnapshot]:
    return {n: qlayers.snapshot(m) for n, m in sorted(tinymodels.bnb_layers(model).items())}


def changed(before: dict[str, qlayers.LayerSnapshot], model: torch.nn.Module) -> dict[str, list[str]]:
    now = tinymodels.bnb_layers(model)
    out = {n: before[n].differences(qlayers.snapshot(now[n])) if n in now else ["gone"] for n in before}
    return {n: d for n, d in out.items() if d}
