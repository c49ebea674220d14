"""What every reference adapter layer shares: adapters by name, activation, merge bookkeeping.

The bookkeeping mirrors PEFT's ``BaseTunerLayer`` (``peft/tuners/tuners_utils.py``): merging an
already merged adapter warns and skips, unmerging with nothing merged warns, unmerge walks
``merged_adapters`` in reverse. Merging into a bitsandbytes base is dequantize -> apply -> requantize with
the original settings (``conformance.quant.layers``); into a plain ``nn.Linear`` (the dense twin, ``bits`` ``DENSE``)
the merged weight is written into its weight in its dtype, silently (PEFT's dense layers have no rounding to warn
about). Either way it is computed on a copy so a failed (safe) merge leaves the base layer bit-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from conformance.quant import layers as qlayers

BASE_ADAPTER = "__base__"
"""Name used in a mixed batch (``adapter_names``) for samples that get no adapter (PEFT)."""


#: ``QuantAdapterLayer.bits`` of a layer over a plain ``nn.Linear`` (the dense twin)
DENSE = 0


def nan_message(adapter: str) -> str:
    """PEFT's safe-merge error text (``peft/tuners/lora/bnb.py``), kept verbatim."""
    return f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"


class QuantAdapterLayer(nn.Module):
    """Base class of the reference LoRA/OFT layers over a bitsandbytes layer."""

    method: ClassVar[str] = ""
    #: 4 or 8: the bitsandbytes base it wraps; 0: a plain ``nn.Linear`` (the dense twin, ``DENSE``)
    bits: ClassVar[int] = 0
    #: the module name PEFT's rounding warning says (default the method; DoRA is merged by PEFT's LoRA layer: "lora")
    warning_module: ClassVar[str] = ""
    merge_warning: ClassVar[str] = ""
    unmerge_warning: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each concrete (method, bits) class PEFT's rounding warnings, verbatim
        (``peft/tuners/lora/bnb.py``, ``peft/tuners/oft/bnb.py`` up to 0.20: "Merge lora module to
        4-bit linear may get different generations due to rounding errors.")."""
        super().__init_subclass__(**kwargs)
        if cls.method and cls.bits:
            module = cls.warning_module or cls.method
            tail = f" {module} module to {cls.bits}-bit linear may get different generations due to rounding errors."
            cls.merge_warning = "Merge" + tail
            cls.unmerge_warning = "Unmerge" + tail

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if self.bits == DENSE:
            if not qlayers.is_dense(base_layer):
                raise qlayers.BaseLayerError(f"{type(self).__name__} wraps a plain torch.nn.Linear, got "
                                             f"{type(base_layer).__name__}; use the 4-bit or 8-bit variant")
        elif (actual := qlayers.bits_of(base_layer)) != self.bits:
            expected = "bnb.nn.Linear4bit" if self.bits == 4 else "bnb.nn.Linear8bitLt"
            raise qlayers.BaseLayerError(
                f"{type(self).__name__} wraps a {expected}, got {type(base_layer).__name__}; "
                f"use the {actual}-bit variant of this layer instead"
            )
        else:
            qlayers.require_quantized(base_layer)
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.configs: dict[str, Any] = {}  # adapter name -> its config dataclass (LoraConfig / OftConfig)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantAdapterLayer:
        """``nn.Module._apply`` plus the bitsandbytes 8-bit state it leaves behind on a device move."""
        super()._apply(fn, recurse)
        qlayers.follow_weight_device(self)
        return self

    # -- adapter registry --------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def _new_adapter(self, name: str, **kwargs: Any) -> None:
        raise NotImplementedError

    def _drop_adapter(self, name: str) -> None:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's trainable tensors under their canonical (PEFT) names."""
        raise NotImplementedError

    def _check_name(self, name: object) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name must be a non-empty string, got {name!r}")
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no adapter' in mixed batches; choose another name")
        return name

    def _require_known(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(
                f"unknown adapter(s) {unknown}; this layer has {self.adapter_names}. "
                "Add it with add_adapter(name, ...) first"
            )

    def add_adapter(self, adapter_name: str, **kwargs: Any) -> None:
        """Add a new adapter (same keyword arguments as the constructor); it does not become active."""
        self._check_name(adapter_name)
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick a new name")
        self._new_adapter(adapter_name, **kwargs)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make these adapters the active ones (PEFT: they become trainable, others frozen)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require_known(names)
        self.active_adapters = names
        for name in self.adapter_names:
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require_known([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge() before deleting it")
        self._drop_adapter(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    # -- enable / disable --------------------------------------------------------------
    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT semantics: disabled adapters are skipped; a merged layer is unmerged on the next forward."""
        self._disable_adapters = not enabled

    # -- merge -------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _adapters_to_merge(self, adapter_names: Sequence[str] | None) -> list[str]:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        self._require_known(names)
        if self.merged:
            already = set(self.merged_adapters)
            todo = [n for n in names if n not in already]
            if todo:
                warnings.warn(
                    f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                    f"You are now additionally merging {','.join(todo)}.",
                    stacklevel=3,
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
            names = todo
        return names

    def _merged_weights(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new weight, new bias) in float32 after applying adapter ``name``; no side effects."""
        raise NotImplementedError

    def _unmerged_weights(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _write_base(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if self.bits == DENSE:
            self.base_layer.weight.data = weight.to(self.base_layer.weight.dtype)
        else:
            qlayers.requantize(self.base_layer, weight)
        if bias is not None:
            self.base_layer.bias.data = bias.to(self.base_layer.bias.dtype)

    def base_weight(self) -> torch.Tensor:
        """The base weight the layer computes with: dequantized (float32) over a bitsandbytes base; over a dense
        base its own weight, detached, in its dtype (a float64 twin merges in float64)."""
        if self.bits == DENSE:
            return self.base_layer.weight.detach()
        return qlayers.dequantize(self.base_layer)

    def _current(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base_bias = getattr(self.base_layer, "bias", None)
        w = self.base_weight()
        return w, None if base_bias is None else base_bias.detach().to(w.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Merge adapters into the base weights (quantized: dequantize, apply, requantize; dense: in place, in the
        weight's dtype).

        ``safe_merge=True`` checks the merged weights for NaN/Inf before anything is written
        and raises ``ValueError`` with PEFT's message; the base layer then stays bit-identical
        and nothing is marked merged. Without it a non-finite result is still written (as PEFT
        does) but never silently: a ``RuntimeWarning`` names the adapter (clause SAFE-UNSAFE-WARNS).
        """
        for name in self._merge_order(self._adapters_to_merge(adapter_names)):
            if self.merge_warning:  # a dense base has no rounding to warn about (PEFT's dense layers do not warn)
                warnings.warn(self.merge_warning, UserWarning, stacklevel=2)
            weight, bias = self._current()
            new_weight, new_bias = self._merged_weights(name, weight, bias)
            finite = bool(torch.isfinite(new_weight).all()) and (new_bias is None or bool(torch.isfinite(new_bias).all()))
            if not finite:
                if safe_merge:
                    raise ValueError(nan_message(name))
                warnings.warn(
                    f"merging adapter {name!r} writes non-finite values (NaN/Inf) into the base weights; "
                    "the layer is now broken. Use merge(safe_merge=True) to refuse such a merge.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._write_base(new_weight, new_bias)
            self.merged_adapters.append(name)

    def _merge_order(self, names: list[str]) -> list[str]:
        """Order in which ``merge`` applies ``names`` (LoRA deltas commute; OFT overrides)."""
        return names

    def unmerge(self) -> None:
        """Undo every merge, most recent first (subtract the delta / apply the inverse rotation)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            if self.unmerge_warning:
                warnings.warn(self.unmerge_warning, UserWarning, stacklevel=2)
            weight, bias = self._current()
            new_weight, new_bias = self._unmerged_weights(name, weight, bias)
            self._write_base(new_weight, new_bias)
            self.merged_adapters.pop()

    # -- forward helpers ---------------------------------------------------------------
    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output; a 1-D input goes through as one row.

        bitsandbytes 0.50's CUDA int8 matmul rejects 1-D inputs ("Only two or three dimensional
        matrices are supported for argument A", backends/cuda/ops.py), as does its CPU eval path.
        A dense base (the twin) computes ``F.linear`` with its weight and bias in the input's dtype (a float64 twin
        computes in float64 throughout).
        """
        if self.bits == DENSE:
            bias = self.base_layer.bias
            return torch.nn.functional.linear(
                x, self.base_layer.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        if x.dim() == 1:
            return self.base_layer(x.unsqueeze(0)).squeeze(0)
        return self.base_layer(x)

    def _check_input(self, x: torch.Tensor, adapter_names: Sequence[str] | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension is {x.shape[-1] if x.dim() else 'missing (0-d tensor)'}, "
                f"but this layer has in_features={self.in_features}; reshape the input to (..., {self.in_features})"
            )
        if adapter_names is None:
            return
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list with one adapter name per sample, not a string")
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0] if x.dim() >= 2 else 'an unbatched 1-D input'} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        self._require_known([n for n in set(adapter_names) if n != BASE_ADAPTER])

    @staticmethod
    def _groups(adapter_names: Sequence[str]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(i)
        return groups

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}"
