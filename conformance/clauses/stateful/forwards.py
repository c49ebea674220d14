"""Stateful ops that run the layer: a forward, a mixed-batch forward and a training step (the op table is in
``ops``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conformance.clauses.stateful.declare import ADAPTERS
from conformance.quant.torchnames import grad_mode

from .driver import Driver

if TYPE_CHECKING:
    from .ops import Args


def forward(d: Driver, a: Args) -> None:
    x = d.input(a["lead"], a["dtype"], a["seed"])
    unmerges = d.pending_unmerge_on_forward()
    bias_before = d.bias_dtype()

    def go() -> torch.Tensor:
        with grad_mode(a["grad_mode"]):
            return d.layer(x)

    y = d.call(f"forward under {a['grad_mode']}", go)
    if unmerges:
        d.forward_unmerge(x.dtype, bias_before)
    d.bnb8_bias_cast(x.dtype)
    d.check_invariants()
    d.check_output(y, x)


def mixed_forward(d: Driver, a: Args) -> None:
    names = list(a["adapter_names"])
    x = d.input((len(names),), a["dtype"], a["seed"])

    def go() -> torch.Tensor:
        with torch.no_grad():
            return d.layer(x, adapter_names=names)

    y = d.call("forward with adapter_names", go)
    d.bnb8_bias_cast(x.dtype)
    d.check_invariants()
    d.check_output(y, x, names)


def train_step(d: Driver, a: Args) -> None:
    lead = a["lead"]
    x = d.input(lead, "float32", a["seed"])
    g = torch.randn(*lead, d.config.out_features, generator=torch.Generator().manual_seed(a["seed"] + 1))
    unmerges = d.pending_unmerge_on_forward()
    bias_before = d.bias_dtype()
    holder: dict[str, torch.Tensor] = {}

    def go() -> None:
        with torch.enable_grad():
            y = d.layer(x)
            holder["y"] = y.detach()
            params = [p for n in d.names for p in d.layer.adapter_parameters(n).values()]
            for p in params:
                p.grad = None
            loss = (y.float() * g.to(y.device)).sum()
            if loss.requires_grad:
                loss.backward()
            opt_params = [p for p in params if p.grad is not None]
            if opt_params:
                if a.get("max_norm") is not None:  # traces recorded before clipping replay as they ran
                    torch.nn.utils.clip_grad_norm_(opt_params, a["max_norm"])
                torch.optim.SGD(opt_params, lr=a["lr"]).step()
            for p in params:
                p.grad = None

    d.call("forward + backward + SGD step", go)
    if unmerges:
        d.forward_unmerge(x.dtype, bias_before)
    d.bnb8_bias_cast(x.dtype)
    d.check_flags()
    d.check_base()
    d.check_output(holder["y"], x)
    trainable = set() if (d.model.disabled or d.merged) else set(d.model.active)
    for name, ad in d.model.adapters.items():
        new = d.read(name)
        changed = any(not new[k].equal(ad.tensors[k]) for k in ad.tensors if k in new)
        if changed and name not in trainable:
            d.fail(ADAPTERS, f"an optimizer step changed adapter {name!r}, which is not trained in this state "
                             f"(active={d.model.active}, merged={d.model.merged}, disabled={d.model.disabled})")
        if changed:
            ad.tensors = new
