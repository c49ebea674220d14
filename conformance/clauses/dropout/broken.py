"""Broken twins of the dropout clauses: the reference with one plausible bug each
(``suites/test_coverage_checks.py`` shows each clause fails on its twin while the reference passes)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin
from conformance.clauses.interface import AdapterSpec
from conformance.core.vocabulary import LORA_LIKE

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}


class _AlwaysDropout(nn.Module):
    """functional dropout with training=True: active in eval mode too."""

    def __init__(self, p: float, rescale: bool = True) -> None:
        super().__init__()
        self.p, self.rescale = p, rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rescale:
            return nn.functional.dropout(x, self.p, training=True)
        return x * torch.bernoulli(torch.full_like(x, 1 - self.p)) if self.training else x


def _lora_dropouts(layer: nn.Module, make: Callable[[float], nn.Module]) -> None:
    for name, cfg in layer.configs.items():
        if getattr(cfg, "lora_dropout", 0.0) > 0:
            layer.lora_dropout[name] = make(cfg.lora_dropout)


def _always_training(layer: nn.Module, method: str) -> None:
    """Bind ``layer.<method>`` to a version that runs with ``self.training`` True whatever the module's mode."""
    orig = getattr(layer, method)

    def always(self: nn.Module, *args: object) -> torch.Tensor:
        was = self.training
        self.training = True
        try:
            return orig(*args)
        finally:
            self.training = was
    bind(layer, method, always)


@twin("DROPOUT-EVAL-EXACT", "dropout-in-eval")
def dropout_in_eval(layer: nn.Module, spec: AdapterSpec) -> None:
    """Dropout ignores the module's mode (functional dropout with training=True / OFT ignoring self.training; DoRA:
    both, since its eval path, as PEFT's, does not call the dropout module at all)."""
    if spec.method in LORA_LIKE:
        _lora_dropouts(layer, _AlwaysDropout)
        if spec.method == "dora":
            _always_training(layer, "_dora")
        return
    _always_training(layer, "_dropout")


@twin("DROPOUT-TRAIN-ACTIVE", "dropout-never")
def dropout_never(layer: nn.Module, spec: AdapterSpec) -> None:
    """The dropout probability is accepted and ignored (PEFT v0.21.2's OFT module_dropout, for every method)."""
    if spec.method in LORA_LIKE:
        _lora_dropouts(layer, lambda p: nn.Identity())
    else:
        bind(layer, "_dropout", lambda self, name, blocks: blocks)


@twin("DROPOUT-TRAIN-MEAN", "dropout-biased")
def dropout_biased(layer: nn.Module, spec: AdapterSpec) -> None:
    """LoRA, DoRA: dropout without the 1/(1-p) rescale; OFT: dropped blocks become zero instead of the identity."""
    if spec.method in LORA_LIKE:
        _lora_dropouts(layer, lambda p: _AlwaysDropout(p, rescale=False))
        return
    orig = layer._dropout

    def zeroed(self: nn.Module, name: str, blocks: torch.Tensor) -> torch.Tensor:
        out = orig(name, blocks)
        eye = torch.eye(out.shape[-1], dtype=out.dtype, device=out.device)
        dropped = (out == eye).all(dim=-1).all(dim=-1)
        return torch.where(dropped.view(-1, 1, 1), torch.zeros_like(out), out)
    bind(layer, "_dropout", zeroed)
