"""Ownership of an adapter layer's tensors when the layer *is* the quantized layer (``conformance.clauses.ownership``).

AdapterHub ``adapters`` 1.3.0 (``src/adapters/methods/lora.py``) subclasses the bitsandbytes layer
(``LoRALinear4bit(LoRALinear, Linear4bit)``) and takes over its weight and quant state, so the module a wrapper
returns as ``base_layer`` holds the adapter too. Here a minimal such layer (the bitsandbytes base with its class
swapped for a subclass that adds a LoRA path) is checked against a wrapping layer (the bitsandbytes base kept apart,
PEFT's shape): the base's parameters, the base output and the state-dict entries of the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from conformance.clauses import ownership
from conformance.quant.layers import make_base_layer

IN, OUT, R = 64, 32, 4


def _lora() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    a, b = nn.Linear(IN, R, bias=False), nn.Linear(R, OUT, bias=False)
    nn.init.normal_(b.weight)
    return a, b


class _IsA(bnb.nn.Linear4bit):
    """A bitsandbytes layer that also holds a LoRA adapter (the class of ``adapters``' ``LoRALinear4bit``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(x))


class _Protocol(nn.Module):
    """The protocol's view: ``base_layer`` and ``adapter_parameters``, over ``inner`` (an ``_IsA``) or apart."""

    def __init__(self, is_a: bool) -> None:
        super().__init__()
        base = make_base_layer(IN, OUT, bits=4, bias=True)
        a, b = _lora()
        if is_a:
            base.__class__ = _IsA
            base.lora_A, base.lora_B = a, b
            self.inner = base
        else:
            self.inner = base
            self.lora_A, self.lora_B = a, b

    @property
    def base_layer(self) -> nn.Module:
        return self.inner

    def _adapter(self) -> nn.Module:
        return self.inner if isinstance(self.inner, _IsA) else self

    def adapter_parameters(self, name: str) -> Mapping[str, torch.Tensor]:
        m = self._adapter()
        return {"lora_A.weight": m.lora_A.weight, "lora_B.weight": m.lora_B.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.inner, _IsA):
            return self.inner(x)
        return self.inner(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("is_a", [True, False], ids=["is-the-quantized-layer", "wraps-it"])
def test_base_parameters_are_the_base_layers_minus_the_adapters(is_a: bool) -> None:
    layer = _Protocol(is_a)
    assert ownership.holds_adapter(layer, ["default"]) is is_a
    assert [n for n, _ in ownership.base_parameters(layer, ["default"])] == ["weight", "bias"]


@pytest.mark.parametrize("is_a", [True, False], ids=["is-the-quantized-layer", "wraps-it"])
def test_base_output_runs_no_adapter(is_a: bool) -> None:
    layer = _Protocol(is_a)
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = bnb.nn.Linear4bit.forward(layer.base_layer, x)
        got = ownership.base_output(layer, x)
        adapted = layer(x)
    assert torch.equal(got, want)
    assert not torch.equal(adapted, want)  # the adapter is not zero: calling base_layer itself would differ


@pytest.mark.parametrize("is_a", [True, False], ids=["is-the-quantized-layer", "wraps-it"])
def test_state_dict_keeps_exactly_the_adapter_entries(is_a: bool) -> None:
    layer = _Protocol(is_a)
    keys = list(layer.state_dict())
    kept = ownership.adapter_state_keys(layer, ["default"], keys)
    want = ["inner.lora_A.weight", "inner.lora_B.weight"] if is_a else ["lora_A.weight", "lora_B.weight"]
    assert sorted(kept) == want, keys
    assert any(k.startswith("inner.weight.") for k in keys)  # the quant state's entries are there, and left out
