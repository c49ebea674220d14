"""Broken twins of the forward clauses: the reference with one plausible bug each."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin, with_params
from conformance.clauses.interface import AdapterSpec
from conformance.core.vocabulary import LORA_LIKE
from conformance.reference import rotation

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}
#: further (clause, twin) pairs (``@twin(..., more=True)``), each failing its clause through one of the cases
#: added for storage dtypes, lora_bias in the oracles, the output dtype and a valid base after a merge
MORE: list[tuple[str, Broken]] = []


@twin("FWD-INIT-IDENTITY", "nonzero-init")
def nonzero_init(layer: nn.Module, spec: AdapterSpec) -> None:
    """'Default' init that is not the identity (B += 1e-3 / R != I)."""
    key = "oft_R.weight" if spec.method == "oft" else "lora_B.weight"  # DoRA: LoRA's B
    with torch.no_grad():
        layer.adapter_parameters(spec.adapter_name)[key].add_(1e-3)


@twin("FWD-ORACLE", "wrong-scaling-or-rotation")
def rslora_confusion(layer: nn.Module, spec: AdapterSpec) -> None:
    """LoRA: scaling = alpha/sqrt(r) even without rsLoRA; OFT: the forward rotates with R^T."""
    if spec.method == "lora":
        cfg = layer.configs[spec.adapter_name]
        layer.scaling[spec.adapter_name] = cfg.lora_alpha / cfg.r**0.5
    else:
        bind(layer, "_rotate", lambda self, name, x: rotation.rotate_input(
            x.float(), self.rotation_blocks(name).transpose(-2, -1), self.layout(name)[0]))


@twin("FWD-LORA-DELTA", "delta-without-scaling")
def delta_without_scaling(layer: nn.Module, spec: AdapterSpec) -> None:
    bind(layer, "get_delta_weight", lambda self, name: self.lora_B[name].weight @ self.lora_A[name].weight)


@twin("FWD-MIXED-BATCH", "ignores-adapter-names")
def ignores_adapter_names(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.forward
    bind(layer, "forward", lambda self, x, adapter_names=None: orig(x))


@twin("FWD-DISABLED", "enable-noop")
def enable_is_noop(layer: nn.Module, spec: AdapterSpec) -> None:
    bind(layer, "enable_adapters", lambda self, enabled: None)


@twin("FWD-ERR-SHAPE", "pads-input")
def pads_input(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.forward

    def forward(self: nn.Module, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
        n = self.in_features
        x = x[..., :n] if x.shape[-1] > n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))
        return orig(x, adapter_names)
    bind(layer, "forward", forward)


@twin("FWD-ERR-ADAPTER-NAME", "unknown-names-to-base")
def unknown_names_to_base(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.forward

    def forward(self: nn.Module, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
        if adapter_names is not None:
            adapter_names = [n if n in self.adapter_names else "__base__" for n in adapter_names]
        return orig(x, adapter_names)
    bind(layer, "forward", forward)


def clamp_rank(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method in LORA_LIKE and params.get("r", 8) <= 0:
        params["r"] = 1
    return params


def adjust_oft_layout(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """PEFT-like: silently pick a valid r / block size."""
    if method == "oft":
        if params.get("r", 8) and 64 % params["r"]:
            params["r"] = 4
        if params.get("oft_block_size", 0) and 64 % params["oft_block_size"]:
            params["oft_block_size"] = 16
    return params


@twin("FWD-ORACLE", "forward-drops-lora-bias", more=True)
def forward_drops_lora_bias(layer: nn.Module, spec: AdapterSpec) -> None:
    """The forward leaves out lora_B.bias (only the merge applies it)."""
    if spec.method != "lora":
        return

    def add(self: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, inplace: bool) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.weight.dtype), a.weight), b.weight)
        return torch.add(result, delta.to(result.dtype), alpha=self.scaling[name])
    bind(layer, "_add_lora", add)


@twin("FWD-ORACLE", "output-in-float32", more=True)
@twin("FWD-INIT-IDENTITY", "output-in-float32", more=True)
@twin("FWD-MIXED-BATCH", "output-in-float32", more=True)
@twin("FWD-DISABLED", "output-in-float32", more=True)
def output_in_float32(layer: nn.Module, spec: AdapterSpec) -> None:
    """The output comes back in float32 (the adapter's dtype) whatever the input's dtype."""
    orig = layer.forward
    bind(layer, "forward", lambda self, x, adapter_names=None: orig(x, adapter_names).float())


@twin("FWD-LORA-DELTA", "transposed-delta", more=True)
def transposed_delta(layer: nn.Module, spec: AdapterSpec) -> None:
    """get_delta_weight returns (scaling B A)^T: right shape on a square layer, wrong on a non-square one."""
    orig = layer.get_delta_weight
    bind(layer, "get_delta_weight", lambda self, name: orig(name).t())


BROKEN["FWD-ERR-RANK"] = Broken("clamps-rank", spec_hook=with_params(r=clamp_rank))
BROKEN["FWD-ERR-OFT-LAYOUT"] = Broken("adjusts-layout", spec_hook=with_params(r=adjust_oft_layout))


@twin("FWD-ORACLE", "dora-wrong-norm", more=True)
def dora_wrong_norm(layer: nn.Module, spec: AdapterSpec) -> None:
    """DoRA: the weight norm taken on ``W0`` alone, ``||W0||_c`` instead of ``||W0 + s B A||_c`` (the norm the
    magnitude is initialised from, reused as the denominator), in the forward and in the merge alike: one consistent
    bug, so a merge round trip still comes back. (The norm over the wrong axis of the out x in weight, the columns,
    has ``in_features`` entries and does not broadcast against the magnitude on a non-square layer: that bug crashes
    rather than computes a wrong number.)"""
    if spec.method != "dora":
        return
    bind(layer, "weight_norm", lambda self, name, weight: torch.linalg.vector_norm(
        weight.detach().to(self.lora_A[name].weight.dtype), dim=1))

    def merged(self: nn.Module, name: str, w: torch.Tensor, b: torch.Tensor | None) -> Any:
        norm = torch.linalg.vector_norm(self._unmerged_base_weight(), dim=1)
        self._merge_norms[name] = norm  # the unmerge divides by the same (wrong) factor
        factor = self._factor(name, norm).detach().float()
        return factor[:, None] * (w + self.get_delta_weight(name).detach().float()), b
    bind(layer, "_merged_weights", merged)
