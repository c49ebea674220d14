"""Broken twins of the safe-merge clauses: the reference with one plausible bug each."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin
from conformance.clauses.interface import AdapterSpec
from conformance.quant import layers as qlayers

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}


@twin("SAFE-MERGE-NONFINITE", "writes-before-check")
def writes_before_check(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        orig(False, adapter_names)
        if safe_merge and not torch.isfinite(qlayers.dequantize(self.base_layer)).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {self.merged_adapters[-1]} "
                             "seems to be broken")
    bind(layer, "merge", merge)


@twin("SAFE-MERGE-OTHER-ADAPTER", "records-refused-merge")
def records_refused_merge(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        try:
            orig(safe_merge, adapter_names)
        except ValueError:
            self.merged_adapters.extend(adapter_names or self.active_adapters)
            raise
    bind(layer, "merge", merge)


@twin("SAFE-MERGE-FINITE-BIAS", "safe-bias-crashes")
def safe_bias_crashes(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        orig(safe_merge, adapter_names)
        if safe_merge and self.lora_B[self.merged_adapters[-1]].bias is not None:
            raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
    bind(layer, "merge", merge)


@twin("SAFE-UNSAFE-WARNS", "no-nan-warning")
def no_nan_warning(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            orig(safe_merge, adapter_names)
    bind(layer, "merge", merge)
