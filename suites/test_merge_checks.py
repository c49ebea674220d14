"""Every forward / merge / safe-merge / OFT-math clause passes on the reference and fails on a broken layer.

Each broken implementation subclasses the reference implementation and patches one behaviour of
the layer it creates (a bug someone could plausibly write); the clause must report ``failed``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conformance.clauses.clause import get
from conformance.clauses.interface import AdapterSpec
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import layers as qlayers
from conformance.reference import rotation

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from clause_table import clause_table_tests  # noqa: E402

Patch = Callable[[nn.Module, AdapterSpec], None]



class Broken(ReferenceImplementation):
    """The reference with one deliberate bug: ``patch(layer, spec)`` and/or ``spec_hook(spec)``."""

    def __init__(self, name: str, patch: Patch | None = None,
                 spec_hook: Callable[[AdapterSpec], AdapterSpec] | None = None) -> None:
        super().__init__()
        self.name = f"broken-{name}"
        self.patch = patch
        self.spec_hook = spec_hook

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        if self.spec_hook is not None:
            spec = self.spec_hook(spec)
        layer = super().create(base_layer, spec)
        if self.patch is not None:
            self.patch(layer, spec)
        return layer


def bind(layer: nn.Module, name: str, fn: Callable[..., Any]) -> None:
    object.__setattr__(layer, name, types.MethodType(fn, layer))


def with_params(**changes: Any) -> Callable[[AdapterSpec], AdapterSpec]:
    def hook(spec: AdapterSpec) -> AdapterSpec:
        params = dict(spec.params)
        for k, v in changes.items():
            if callable(v):
                params = v(spec.method, params)
            else:
                params[k] = v
        return dataclasses.replace(spec, params=params)
    return hook


# -- the bugs ----------------------------------------------------------------------------------

def nonzero_init(layer: nn.Module, spec: AdapterSpec) -> None:
    """'Default' init that is not the identity (B += 1e-3 / R != I)."""
    key = "lora_B.weight" if spec.method == "lora" else "oft_R.weight"
    with torch.no_grad():
        layer.adapter_parameters(spec.adapter_name)[key].add_(1e-3)


def rslora_confusion(layer: nn.Module, spec: AdapterSpec) -> None:
    """LoRA: scaling = alpha/sqrt(r) even without rsLoRA; OFT: the forward rotates with R^T."""
    if spec.method == "lora":
        cfg = layer.configs[spec.adapter_name]
        layer.scaling[spec.adapter_name] = cfg.lora_alpha / cfg.r**0.5
    else:
        bind(layer, "_rotate", lambda self, name, x: rotation.rotate_input(
            x.float(), self.rotation_blocks(name).transpose(-2, -1), self.layout(name)[0]))


def delta_without_scaling(layer: nn.Module, spec: AdapterSpec) -> None:
    bind(layer, "get_delta_weight", lambda self, name: self.lora_B[name].weight @ self.lora_A[name].weight)


def ignores_adapter_names(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.forward
    bind(layer, "forward", lambda self, x, adapter_names=None: orig(x))


def enable_is_noop(layer: nn.Module, spec: AdapterSpec) -> None:
    bind(layer, "enable_adapters", lambda self, enabled: None)


def pads_input(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.forward

    def forward(self: nn.Module, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
        n = self.in_features
        x = x[..., :n] if x.shape[-1] > n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))
        return orig(x, adapter_names)
    bind(layer, "forward", forward)


def unknown_names_to_base(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.forward

    def forward(self: nn.Module, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
        if adapter_names is not None:
            adapter_names = [n if n in self.adapter_names else "__base__" for n in adapter_names]
        return orig(x, adapter_names)
    bind(layer, "forward", forward)


def clamp_rank(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "lora" and params.get("r", 8) <= 0:
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


def merge_unscaled(layer: nn.Module, spec: AdapterSpec) -> None:
    if spec.method == "lora":
        bind(layer, "_merged_weights", lambda self, name, w, b: (
            w + (self.lora_B[name].weight @ self.lora_A[name].weight).detach().float(), b))
    else:  # merge with R instead of R^T
        bind(layer, "_merged_weights", lambda self, name, w, b: (w @ self.get_delta_weight(name).detach().float(), b))


def unmerge_wrong(layer: nn.Module, spec: AdapterSpec) -> None:
    if spec.method == "lora":
        bind(layer, "_unmerged_weights", lambda self, name, w, b: (
            w - 0.9 * self.get_delta_weight(name).detach().float(), b))
    else:  # "inverse" = applying the rotation again
        bind(layer, "_unmerged_weights", lambda self, name, w, b: (
            w @ self.get_delta_weight(name).detach().float().t(), b))


def silent_merge(layer: nn.Module, spec: AdapterSpec) -> None:
    object.__setattr__(layer, "merge_warning", "merged")


def merges_twice(layer: nn.Module, spec: AdapterSpec) -> None:
    bind(layer, "_adapters_to_merge", lambda self, names: list(self.active_adapters if names is None else names))


def unmerge_silent(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.unmerge
    bind(layer, "unmerge", lambda self: orig() if self.merged else None)


def multi_merge_wrong(layer: nn.Module, spec: AdapterSpec) -> None:
    if spec.method == "oft":  # the order PEFT 0.21 uses
        bind(layer, "_merge_order", lambda self, names: names)
    else:
        orig = layer._adapters_to_merge
        bind(layer, "_adapters_to_merge", lambda self, names: orig(names)[:1])


def merge_ignores_names(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge
    bind(layer, "merge", lambda self, safe_merge=False, adapter_names=None: orig(safe_merge))


def bias_unscaled(layer: nn.Module, spec: AdapterSpec) -> None:
    """PEFT 0.21 bnb layers: b + b_B."""
    orig = layer._merged_weights

    def merged(self: nn.Module, name: str, w: torch.Tensor, b: torch.Tensor | None) -> Any:
        new_w, _ = orig(name, w, b)
        bb = self.lora_B[name].bias
        return new_w, b if bb is None else b + bb.detach().float()
    bind(layer, "_merged_weights", merged)


def default_requant_settings(layer: nn.Module, spec: AdapterSpec) -> None:
    """Requantize with bnb defaults (nf4, blocksize 64, no double quant) instead of the layer's."""
    def write(self: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.base_layer
        if qlayers.bits_of(base) == 4:
            import bitsandbytes as bnb
            base.weight = bnb.nn.Params4bit(weight.detach().float().contiguous(), requires_grad=False,
                                            module=base).to(base.weight.device)
        else:
            qlayers.requantize(base, weight)
            base.state.threshold = 6.0
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
    bind(layer, "_write_base", write)


def writes_before_check(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        orig(False, adapter_names)
        if safe_merge and not torch.isfinite(qlayers.dequantize(self.base_layer)).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {self.merged_adapters[-1]} "
                             "seems to be broken")
    bind(layer, "merge", merge)


def records_refused_merge(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        try:
            orig(safe_merge, adapter_names)
        except ValueError:
            self.merged_adapters.extend(adapter_names or self.active_adapters)
            raise
    bind(layer, "merge", merge)


def safe_bias_crashes(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        orig(safe_merge, adapter_names)
        if safe_merge and self.lora_B[self.merged_adapters[-1]].bias is not None:
            raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
    bind(layer, "merge", merge)


def no_nan_warning(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge

    def merge(self: nn.Module, safe_merge: bool = False, adapter_names: Any = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            orig(safe_merge, adapter_names)
    bind(layer, "merge", merge)


def transposed_rotation(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.get_delta_weight
    bind(layer, "get_delta_weight", lambda self, name: orig(name).t())


def scaled_rotation(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.get_delta_weight
    bind(layer, "get_delta_weight", lambda self, name: orig(name) * 1.001)


def peft_neumann(layer: nn.Module, spec: AdapterSpec) -> None:
    """PEFT 0.21 _cayley_batch Neumann branch: I + 2Q + 2Q^2 + ... + Q^(n-1) (the transpose's series)."""
    orig = layer.rotation_blocks

    def blocks(self: nn.Module, name: str) -> torch.Tensor:
        cfg = self.configs[name]
        if not cfg.use_cayley_neumann:
            return orig(name)
        _, size = self.layout(name)
        q = rotation.skew(self.oft_R[name], size)
        eye = torch.eye(size, dtype=q.dtype).expand_as(q)
        r = eye.clone()
        n = cfg.num_cayley_neumann_terms
        if n > 1:
            r = r + 2 * q
            if n > 2:
                q2 = q @ q
                r = r + 2 * q2
                p = q2
                for _ in range(3, n - 1):
                    p = p @ q
                    r = r + 2 * p
                r = r + p @ q
        return r
    bind(layer, "rotation_blocks", blocks)


def ignore_coft(layer: nn.Module, spec: AdapterSpec) -> None:
    name = spec.adapter_name
    if spec.method == "oft":
        layer.configs[name] = dataclasses.replace(layer.configs[name], coft=False)


def drop_block_share(method: str, params: dict[str, Any]) -> dict[str, Any]:
    params.pop("block_share", None)
    return params


BROKEN: dict[str, Broken] = {
    "FWD-INIT-IDENTITY": Broken("nonzero-init", nonzero_init),
    "FWD-ORACLE": Broken("wrong-scaling-or-rotation", rslora_confusion),
    "FWD-LORA-DELTA": Broken("delta-without-scaling", delta_without_scaling),
    "FWD-MIXED-BATCH": Broken("ignores-adapter-names", ignores_adapter_names),
    "FWD-DISABLED": Broken("enable-noop", enable_is_noop),
    "FWD-ERR-SHAPE": Broken("pads-input", pads_input),
    "FWD-ERR-ADAPTER-NAME": Broken("unknown-names-to-base", unknown_names_to_base),
    "FWD-ERR-RANK": Broken("clamps-rank", spec_hook=with_params(r=clamp_rank)),
    "FWD-ERR-OFT-LAYOUT": Broken("adjusts-layout", spec_hook=with_params(r=adjust_oft_layout)),
    "MERGE-FORWARD-BOUND": Broken("merge-unscaled", merge_unscaled),
    "MERGE-ROUNDTRIP": Broken("unmerge-wrong", unmerge_wrong),
    "MERGE-CYCLES": Broken("unmerge-wrong", unmerge_wrong),
    "MERGE-WARNS-LORA": Broken("silent-merge", silent_merge),
    "MERGE-WARNS-OFT": Broken("silent-merge", silent_merge),
    "MERGE-TWICE-WARNS": Broken("merges-twice", merges_twice),
    "MERGE-UNMERGE-NOTHING-WARNS": Broken("unmerge-silent", unmerge_silent),
    "MERGE-MULTI": Broken("multi-merge-wrong", multi_merge_wrong),
    "MERGE-SUBSET": Broken("merge-ignores-names", merge_ignores_names),
    "MERGE-LORA-BIAS": Broken("bias-unscaled", bias_unscaled),
    "MERGE-KEEPS-QUANT-SETTINGS": Broken("default-requant-settings", default_requant_settings),
    "SAFE-MERGE-NONFINITE": Broken("writes-before-check", writes_before_check),
    "SAFE-MERGE-OTHER-ADAPTER": Broken("records-refused-merge", records_refused_merge),
    "SAFE-MERGE-FINITE-BIAS": Broken("safe-bias-crashes", safe_bias_crashes),
    "SAFE-UNSAFE-WARNS": Broken("no-nan-warning", no_nan_warning),
    "OFT-CAYLEY-EXACT": Broken("transposed-rotation", transposed_rotation),
    "OFT-ORTHOGONAL": Broken("scaled-rotation", scaled_rotation),
    "OFT-NEUMANN-CONVERGES": Broken("peft-neumann", peft_neumann),
    "OFT-COFT-RADIUS": Broken("ignore-coft", ignore_coft),
    "OFT-BLOCK-SHARE": Broken("drop-block-share", spec_hook=with_params(block_share=drop_block_share)),
}


(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = clause_table_tests(BROKEN, {"forward", "merge", "safe_merge", "oft_math"})


# -- issue 14: new cases (storage dtype, lora_bias in the oracles, output dtype, valid base after merge) -----

def forward_drops_lora_bias(layer: nn.Module, spec: AdapterSpec) -> None:
    """The forward leaves out lora_B.bias (only the merge applies it)."""
    if spec.method != "lora":
        return

    def add(self: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, inplace: bool) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.weight.dtype), a.weight), b.weight)
        return torch.add(result, delta.to(result.dtype), alpha=self.scaling[name])
    bind(layer, "_add_lora", add)


def output_in_float32(layer: nn.Module, spec: AdapterSpec) -> None:
    """The output comes back in float32 (the adapter's dtype) whatever the input's dtype."""
    orig = layer.forward
    bind(layer, "forward", lambda self, x, adapter_names=None: orig(x, adapter_names).float())


def _params4bit(base: nn.Module, data: torch.Tensor, **extra: Any) -> Any:
    import bitsandbytes as bnb

    old = base.weight
    return bnb.nn.Params4bit(data, requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                             quant_type=old.quant_type, quant_storage=old.quant_storage, module=base, **extra)


def requant_from_float32(layer: nn.Module, spec: AdapterSpec) -> None:
    """PEFT-like: requantize ``dequantize(W) + delta`` as promoted to float32 (the checkpoint's float16/bfloat16
    storage dtype is lost: quant_state.dtype float32), and write the bias as float32."""
    def write(self: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.base_layer
        if qlayers.bits_of(base) == 4:
            base.weight = _params4bit(base, weight.detach().float().cpu().contiguous()).to(base.weight.device)
        else:
            qlayers.requantize(base, weight)
        if bias is not None:
            base.bias.data = bias.detach().float()
    bind(layer, "_write_base", write)


def merged_forward_adds_bias(layer: nn.Module, spec: AdapterSpec) -> None:
    """The merged bias is right, but the merged layer's forward still adds scaling * b_B."""
    orig = layer.forward

    def forward(self: nn.Module, x: torch.Tensor, adapter_names: Any = None) -> torch.Tensor:
        y = orig(x, adapter_names)
        for n in self.merged_adapters if spec.method == "lora" else ():
            bb = self.lora_B[n].bias
            if bb is not None:
                y = y + (self.scaling[n] * bb).to(y.dtype)
        return y
    bind(layer, "forward", forward)


def leaves_dense_weight(layer: nn.Module, spec: AdapterSpec) -> None:
    """The merge leaves the dense merged weight in the base, marked as quantized (4-bit: the old quant state
    attached; 8-bit: a float16 Int8Params never quantized)."""
    import bitsandbytes as bnb

    def write(self: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.base_layer
        if qlayers.bits_of(base) == 4:
            old = base.weight
            base.weight = _params4bit(base, weight.detach().to(old.quant_state.dtype).contiguous(),
                                      quant_state=old.quant_state, bnb_quantized=True)
        else:
            base.weight = bnb.nn.Int8Params(weight.detach().half().contiguous(), requires_grad=False,
                                            has_fp16_weights=False)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
    bind(layer, "_write_base", write)


def transposed_delta(layer: nn.Module, spec: AdapterSpec) -> None:
    """get_delta_weight returns (scaling B A)^T: right shape on a square layer, wrong on a non-square one."""
    orig = layer.get_delta_weight
    bind(layer, "get_delta_weight", lambda self, name: orig(name).t())


#: (clause, broken variant): each fails its clause through one of issue 14's new cases
NEW_CASES: list[tuple[str, Broken]] = [
    ("FWD-ORACLE", Broken("forward-drops-lora-bias", forward_drops_lora_bias)),
    ("FWD-ORACLE", Broken("output-in-float32", output_in_float32)),
    ("FWD-INIT-IDENTITY", Broken("output-in-float32", output_in_float32)),
    ("FWD-MIXED-BATCH", Broken("output-in-float32", output_in_float32)),
    ("FWD-DISABLED", Broken("output-in-float32", output_in_float32)),
    ("FWD-LORA-DELTA", Broken("transposed-delta", transposed_delta)),
    ("MERGE-KEEPS-QUANT-SETTINGS", Broken("requant-from-float32", requant_from_float32)),
    ("MERGE-FORWARD-BOUND", Broken("requant-from-float32", requant_from_float32)),
    ("MERGE-LORA-BIAS", Broken("merged-forward-adds-bias", merged_forward_adds_bias)),
    ("MERGE-FORWARD-BOUND", Broken("leaves-dense-weight", leaves_dense_weight)),
    ("MERGE-ROUNDTRIP", Broken("leaves-dense-weight", leaves_dense_weight)),
    ("MERGE-KEEPS-QUANT-SETTINGS", Broken("leaves-dense-weight", leaves_dense_weight)),
]


@pytest.mark.parametrize(("clause_id", "impl"), NEW_CASES, ids=[f"{c}-{b.name}" for c, b in NEW_CASES])
def test_new_case_fails_on_broken(clause_id: str, impl: Broken) -> None:
    res = run_clause(get(clause_id), impl)
    assert res.outcome == "failed", f"{impl.name}: {res.outcome}: {res.message}"


@pytest.mark.parametrize("family", ["lora/4bit", "lora/8bit"])
def test_requant_from_float32_fails_both_families(family: str) -> None:
    """4-bit: the storage dtype (quant_state.dtype) is lost; 8-bit: the bias dtype is."""
    res = run_clause(get("MERGE-KEEPS-QUANT-SETTINGS"), Broken("requant-from-float32", requant_from_float32))
    fams = res.family_texts()
    assert fams[family].startswith("failed"), fams
