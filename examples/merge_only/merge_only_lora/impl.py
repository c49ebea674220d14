"""A merge-only, single-adapter LoRA over ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt``.

Shaped like many small LoRA libraries rather than like PEFT: one adapter per layer, ``merge()`` but
no ``unmerge()``, no safe merge, no rsLoRA, no ``lora_bias``, no dropout, its own warning texts.
It declares exactly that (``capabilities`` below), so the conformance suite skips what it lacks
instead of failing it. No conformance imports: this is what a third party writes.

``BROKEN`` selects a deliberately wrong variant (``merge_only_lora.impl:broken``): its merge forgets
the LoRA scaling, which the merge clauses must catch.
"""

from __future__ import annotations

import math
import warnings

import bitsandbytes as bnb
import torch
from torch import nn


def _dequantize(base: nn.Module) -> torch.Tensor:
    w = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if w.dtype != torch.int8:  # has_fp16_weights: the float16 weight itself (bitsandbytes quantizes it per forward)
        return w.data.float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device)).float()


def _requantize(base: nn.Module, dense: torch.Tensor) -> None:
    w = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        base.weight = bnb.nn.Params4bit(
            dense.to(w.quant_state.dtype).cpu().contiguous(), requires_grad=False, blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage,
            module=base,
        ).to(w.device)
    else:
        base.weight = bnb.nn.Int8Params(dense.to(torch.float16).cpu().contiguous(), requires_grad=False,
                                        has_fp16_weights=w.has_fp16_weights).to(w.device)
        base.state.reset_grads()


class MergeOnlyLora(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)) until ``merge()`` folds the adapter into the quantized weight."""

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 init_lora_weights: bool = True, scale_on_merge: bool = True, dtype: torch.dtype = torch.float32,
                 **unsupported) -> None:
        super().__init__()
        unsupported.pop("clone_base_output", None)  # it always clones (see forward)
        for key, off in (("use_rslora", False), ("lora_bias", False), ("lora_dropout", 0.0)):
            if unsupported.get(key, off) == off:
                unsupported.pop(key, None)
        if unsupported:
            raise TypeError(f"merge_only_lora does not support {sorted(unsupported)}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        self.base_layer = base_layer
        self.name = adapter_name
        dev = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B.weight)
        self.scaling = lora_alpha / r
        self.scale_on_merge = scale_on_merge
        self.merged_adapters: list[str] = []

    # -- what the conformance protocol reads ---------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        return [self.name]

    def set_adapter(self, adapter_names) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if names != [self.name]:
            raise ValueError(f"merge_only_lora has one adapter, {self.name!r}; cannot activate {names}")

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        self._known(name)
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def get_delta_weight(self, name: str) -> torch.Tensor:
        self._known(name)
        return self.scaling * self.lora_B.weight @ self.lora_A.weight

    def _known(self, name: str) -> None:
        if name != self.name:
            raise KeyError(f"no adapter {name!r} (this layer has {self.name!r})")

    # -- behaviour -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, adapter_names=None) -> torch.Tensor:
        if adapter_names is not None:
            raise NotImplementedError("merge_only_lora has no mixed batches")
        y = self.base_layer(x).clone()  # bnb may return a view: never update it in place
        if not self.merged:
            h = x.to(self.lora_A.weight.dtype)  # the adapter runs in its own dtype (input_cast)
            y = y + (self.scaling * self.lora_B(self.lora_A(h))).to(y.dtype)
        return y

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if safe_merge:
            raise NotImplementedError("merge_only_lora has no safe merge")
        names = [self.name] if adapter_names is None else list(adapter_names)
        for n in names:
            self._known(n)
        if self.merged:
            warnings.warn(f"adapter {self.name!r} is merged already; merge() does nothing", UserWarning, stacklevel=2)
            return
        bits = 4 if isinstance(self.base_layer, bnb.nn.Linear4bit) else 8
        warnings.warn(f"merging into a {bits}-bit base requantizes the weight: outputs change by rounding",
                      UserWarning, stacklevel=2)
        delta = self.get_delta_weight(self.name) if self.scale_on_merge else self.lora_B.weight @ self.lora_A.weight
        with torch.no_grad():
            _requantize(self.base_layer, _dequantize(self.base_layer) + delta.detach().float())
        self.merged_adapters.append(self.name)


class MergeOnlyImpl:
    """The implementation object: a name, the methods and capabilities it really has, a version and ``create``."""

    methods = frozenset({"lora"})
    capabilities = frozenset({"4bit", "8bit", "input_cast"})

    def __init__(self, name: str = "merge_only", scale_on_merge: bool = True) -> None:
        self.name = name
        self.scale_on_merge = scale_on_merge

    def version(self) -> str:
        return "0.1.0"

    def create(self, base_layer: nn.Module, spec) -> nn.Module:
        if spec.method != "lora":
            raise NotImplementedError(f"merge_only_lora does LoRA only, not {spec.method}")
        if not isinstance(base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            raise TypeError(f"merge_only_lora needs a bitsandbytes layer, got {type(base_layer).__name__}")
        dtype = getattr(torch, getattr(spec, "dtype", "float32"))
        return MergeOnlyLora(base_layer, spec.adapter_name, scale_on_merge=self.scale_on_merge, dtype=dtype,
                             **spec.params)


impl = MergeOnlyImpl()
#: the deliberately broken variant: merge() adds B @ A without the scaling alpha / r
broken = MergeOnlyImpl(name="merge_only_broken", scale_on_merge=False)
