"""Broken twins of the backprop clauses: the reference with a defect injected into the layers it builds
(``Wrapped(patch)``), the defects ``suites/test_backprop.py`` injects that need more than a line, and (``MORE``,
``@twin``) named twins that other suites run against several areas' clauses."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from conformance.clauses import AdapterSpec
from conformance.clauses.broken import Broken, bind, twin
from conformance.impls.reference import ReferenceImplementation

#: further (clause, twin) pairs (``@twin(..., more=True)``): ``dora-norm-not-detached`` fails BACKPROP-GRAD-F64 only
MORE: list[tuple[str, Broken]] = []


class Wrapped(ReferenceImplementation):
    """Reference layers with a deliberate defect injected by ``patch(layer)``."""

    def __init__(self, patch: Callable[[nn.Module], None], methods: frozenset[str] = frozenset({"lora", "oft"}),
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.patch = patch
        self.methods = frozenset(methods)
        self.name = "broken"

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        layer = super().create(base_layer, spec)
        self.patch(layer)
        return layer


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.factor, None


def wrap_forward(layer: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
    orig = layer.forward
    layer.forward = types.MethodType(lambda self, x, adapter_names=None: fn(orig, x, adapter_names), layer)


def drop_lora_bias(layer: nn.Module) -> None:
    """The forward leaves out lora_B.bias (lora_bias runs in the backprop oracle)."""

    def add(self: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, inplace: bool) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.weight.dtype), a.weight), b.weight)
        return torch.add(result, delta.to(result.dtype), alpha=self.scaling[name])

    def lora(self: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:  # the mixed-batch path
        a, b = self.lora_A[name], self.lora_B[name]
        return torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.weight.dtype), a.weight), b.weight)

    layer._add_lora = types.MethodType(add, layer)
    layer._lora = types.MethodType(lora, layer)


@twin("BACKPROP-GRAD-F64", "dora-norm-not-detached", more=True)
def dora_norm_not_detached(layer: nn.Module, spec: AdapterSpec) -> None:
    """DoRA's weight norm ``||W0 + s B A||_c`` keeps its graph: the gradients of ``A`` and ``B`` flow through it
    (arXiv:2402.09353 section 4.3 and PEFT v0.21.2 ``peft/tuners/lora/dora.py`` detach it). The values are the
    reference's, so every forward (and merge) is unchanged; only the gradients of ``A`` and ``B`` differ. LoRA and
    OFT layers are left as they are."""
    if spec.method != "dora":
        return

    def weight_norm(self: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return torch.linalg.vector_norm(weight.detach().to(a.dtype) + (b @ a) * self.scaling[name], dim=1)

    bind(layer, "weight_norm", weight_norm)
