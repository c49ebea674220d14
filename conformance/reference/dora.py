"""Reference DoRA (arXiv:2402.09353) over bitsandbytes 4-bit and 8-bit layers: LoRA plus a magnitude vector.

Semantics follow PEFT 0.21.2 (``peft/tuners/lora/dora.py``, ``peft/tuners/lora/variants.py`` ``DoraLinearVariant``,
``peft/tuners/lora/bnb.py``), with ``W0`` the dequantized base weight, ``n = ||W0 + s B A||_c`` the 2-norm of each
output row and ``m`` the magnitude vector ``lora_magnitude_vector``:

- forward ``y = base(x) + (m/n - 1) * T + (m/n) * s * B(A(dropout(x)))``, the base term ``T = base(x) - bias``
  without dropout or in eval mode and ``T = W0 dropout(x)`` with an active dropout in train mode (PEFT computes the
  magnitude term on the dropped input; the paper's form differs there, see ``conformance.numerics.dora``);
- ``n`` is detached (the paper's section 4.3, PEFT): ``A``, ``B`` and ``m`` get no gradient through it;
- ``m`` starts as ``n`` at the initial ``A``, ``B`` (the row norms of ``W0`` when ``B = 0``);
- merge ``W = (m/n) (W + s B A)`` with ``n`` on the unmerged weight, kept for the unmerge ``W / (m/n) - s B A``;
  both dequantize -> apply in float32 -> requantize (``QuantAdapterLayer.merge``, NaN-guarded safe merge).

Not supported, as in PEFT: ``lora_bias`` (PEFT's ``LoraConfig`` refuses it with DoRA) and mixed batches
(``adapter_names``: "Cannot pass `adapter_names` when DoRA is enabled."). Several active adapters compose in
sequence as in PEFT: without dropout each one's base term is the output so far minus the bias (the composition the
merge makes, ``f_2 (f_1 (W0 + d_1) + d_2)``); with an active dropout in train mode it is ``W0 dropout(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .adapter_layer import BASE_ADAPTER, DENSE
from .lora import LoraLinearQuant


class DoraMagnitude(nn.Module):
    """The magnitude vector of one adapter, as ``.weight`` (PEFT's ``DoraLinearLayer`` holds it the same way, so the
    state-dict key is ``lora_magnitude_vector.<adapter>.weight``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class DoraLinearQuant(LoraLinearQuant):
    method: ClassVar[str] = "dora"

    #: PEFT's rounding warnings say "lora module" for DoRA: the LoRA bnb layer merges it (peft/tuners/lora/bnb.py)
    warning_module: ClassVar[str] = "lora"

    # -- adapters ----------------------------------------------------------------------
    def _new_adapter(self, name: str, **kwargs: Any) -> None:
        if kwargs.get("lora_bias", False):
            raise ValueError("lora_bias=True is not supported for DoRA (PEFT's LoraConfig refuses it too); "
                             "pass lora_bias=False")
        super()._new_adapter(name, **kwargs)
        if "lora_magnitude_vector" not in self._modules:  # created with the first adapter (PEFT does the same)
            self.lora_magnitude_vector = nn.ModuleDict()
            self._merge_norms: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            norm = self.weight_norm(name, self._unmerged_base_weight())
        self.lora_magnitude_vector[name] = DoraMagnitude(norm)
        self.lora_magnitude_vector[name].weight.requires_grad_(name in self.active_adapters)

    def _drop_adapter(self, name: str) -> None:
        super()._drop_adapter(name)
        del self.lora_magnitude_vector[name]
        self._merge_norms.pop(name, None)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        out = super().adapter_parameters(name)
        out["lora_magnitude_vector.weight"] = self.lora_magnitude_vector[name].weight
        return out

    # -- the norm ----------------------------------------------------------------------
    def weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``||W0 + s B A||_c`` of ``weight`` (= W0, out x in) per output row, in the adapter dtype, detached."""
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        v = weight.detach().to(a.dtype) + (b @ a) * self.scaling[name]
        return torch.linalg.vector_norm(v, dim=1).detach()

    def _factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        return self.lora_magnitude_vector[name].weight / norm

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The dequantized base weight with every merged adapter taken out again (in float32, not requantized)."""
        weight, _ = self._current()
        for name in reversed(self.merged_adapters):
            weight = self._undo(name, weight)
        return weight

    # -- merge -------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """``QuantAdapterLayer.merge``, each adapter's norm taken on the unmerged weight as it is when this merge
        starts (the ``W0`` the forward reads), not on one recovered from the weight this merge requantized after
        merging the adapters before it (that one is off by a requantization)."""
        self._merge_start = self._unmerged_base_weight()
        try:
            super().merge(safe_merge, adapter_names)
        finally:
            self._merge_start = None

    def _merged_weights(self, name, weight, bias):
        delta = self.get_delta_weight(name).detach().to(weight.dtype)
        start = getattr(self, "_merge_start", None)
        norm = torch.linalg.vector_norm((self._unmerged_base_weight() if start is None else start) + delta, dim=1)
        self._merge_norms[name] = norm  # kept: the unmerge divides by this very factor (PEFT's cached norm)
        factor = self._factor(name, norm).detach().to(weight.dtype)
        return factor[:, None] * (weight + delta), bias

    def _undo(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        factor = self._factor(name, self._merge_norms[name]).detach().to(weight.dtype)
        return weight / factor[:, None] - self.get_delta_weight(name).detach().to(weight.dtype)

    def _unmerged_weights(self, name, weight, bias):
        new_weight = self._undo(name, weight)
        del self._merge_norms[name]
        return new_weight, bias

    # -- forward -----------------------------------------------------------------------
    def _dora(self, name: str, x: torch.Tensor, result: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """``(m/n - 1) T + (m/n) s B(A(dropout(x)))`` for adapter ``name``; ``result``: the output so far, ``w0``: the
        dequantized base weight (module docstring)."""
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        xt = x.to(a.weight.dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            xd = xt
            bias = self.base_layer.bias
            term = result if bias is None else result - bias
        else:
            xd = dropout(xt)
            term = torch.nn.functional.linear(xd, w0.to(xd.dtype))
        factor = self._factor(name, self.weight_norm(name, w0))  # the norm detached: arXiv:2402.09353 sec. 4.3
        lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, a.weight), b.weight)
        return (factor - 1) * term + factor * lora * s

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        self._check_input(x, adapter_names)
        if adapter_names is not None and any(n != BASE_ADAPTER for n in adapter_names):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x)
        base_out = self._base_forward(x)
        if self.merged or adapter_names is not None:
            return base_out
        result = base_out
        w0 = self.base_weight()  # read once per forward: every adapter's norm is on this W0
        for name in self.active_adapters:  # out of place: bnb's output is never written; cast back after each (PEFT)
            result = (result + self._dora(name, x, result, w0)).to(base_out.dtype)
        return result


class DoraLinear4bit(DoraLinearQuant):
    """DoRA over ``bnb.nn.Linear4bit`` (NF4/FP4)."""

    bits: ClassVar[int] = 4


class DoraLinear8bit(DoraLinearQuant):
    """DoRA over ``bnb.nn.Linear8bitLt`` (LLM.int8 row-wise)."""

    bits: ClassVar[int] = 8


class DoraLinearDense(DoraLinearQuant):
    """DoRA over a plain ``torch.nn.Linear``: the reference's dense twin."""

    bits: ClassVar[int] = DENSE
