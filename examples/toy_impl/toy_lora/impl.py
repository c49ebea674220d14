"""A plain LoRA over ``bnb.nn.Linear4bit``, written from scratch (no PEFT, no conformance imports).

It declares what it has: LoRA on 4-bit bases with unmerge, safe merge, rsLoRA, dropout and an input
cast to the adapter dtype; clauses about OFT, 8-bit layers, several adapters, mixed batches,
lora_bias ... are reported as skipped for it, never failed.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from torch import nn


class ToyLora(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)); merge = dequantize, add B @ A, requantize."""

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", **params) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A, self.lora_B, self.dropout, self.scaling = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict(), {}
        self.merged_adapters: list[str] = []
        self.add_adapter(adapter_name, **params)
        self.active_adapters = [adapter_name]

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, init_lora_weights: bool = True,
                    use_rslora: bool = False, lora_dropout: float = 0.0, **unsupported) -> None:
        unsupported.pop("clone_base_output", None)  # it always clones (see forward)
        if unsupported.pop("lora_bias", False):
            raise TypeError("toy_lora has no lora_bias (it does not declare that capability)")
        if unsupported:
            raise TypeError(f"toy_lora does not support {sorted(unsupported)}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        a = nn.Linear(self.base_layer.in_features, r, bias=False, device=self.base_layer.weight.device)
        b = nn.Linear(r, self.base_layer.out_features, bias=False, device=self.base_layer.weight.device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(b.weight)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.dropout[adapter_name] = nn.Dropout(lora_dropout)
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)

    def set_adapter(self, adapter_names) -> None:
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def get_delta_weight(self, name: str) -> torch.Tensor:
        return self.scaling[name] * self.lora_B[name].weight @ self.lora_A[name].weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x: torch.Tensor, adapter_names=None) -> torch.Tensor:
        if adapter_names is not None:
            raise NotImplementedError("toy_lora has no mixed batches")
        y = self.base_layer(x).clone()  # bnb may return a view: never update it in place
        if not self.merged:
            for name in self.active_adapters:
                h = self.dropout[name](x.to(self.lora_A[name].weight.dtype))
                y = y + (self.scaling[name] * self.lora_B[name](self.lora_A[name](h))).to(y.dtype)
        return y

    def _rewrite(self, sign: float, name: str, safe_merge: bool = False) -> None:
        w = self.base_layer.weight
        dense = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        dense = dense + sign * self.get_delta_weight(name).detach().float()
        if safe_merge and not torch.isfinite(dense).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights")
        self.base_layer.weight = bnb.nn.Params4bit(
            dense.to(w.quant_state.dtype).cpu(), requires_grad=False, blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage,
            module=self.base_layer,
        ).to(w.device)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.merged_adapters:
                self._rewrite(+1.0, name, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._rewrite(-1.0, self.merged_adapters.pop())


class ToyLoraImpl:
    """What the runner needs: a name, methods, capabilities, a version and ``create``."""

    name = "toy_lora"
    methods = frozenset({"lora"})
    capabilities = frozenset({"4bit", "unmerge", "safe_merge", "rslora", "dropout", "input_cast"})

    def version(self) -> str:
        return "0.1.0"

    def create(self, base_layer: nn.Module, spec) -> nn.Module:
        if spec.method != "lora" or not isinstance(base_layer, bnb.nn.Linear4bit):
            raise NotImplementedError(f"toy_lora only does LoRA on bnb.nn.Linear4bit, not {spec.method}")
        return ToyLora(base_layer, spec.adapter_name, **spec.params)


impl = ToyLoraImpl()
