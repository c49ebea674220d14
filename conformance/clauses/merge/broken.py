"""Broken twins of the merge clauses: the reference with one plausible bug each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from conformance.clauses.broken import Broken, bind, twin
from conformance.clauses.interface import AdapterSpec
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import layers as qlayers

#: one broken twin per clause of the area (``@twin``): the clause passes on the reference and fails on it
BROKEN: dict[str, Broken] = {}
#: further (clause, twin) pairs (``@twin(..., more=True)``), each failing its clause through one of the cases
#: added for storage dtypes, lora_bias in the oracles, the output dtype and a valid base after a merge
MORE: list[tuple[str, Broken]] = []


@twin("MERGE-FORWARD-BOUND", "merge-unscaled")
def merge_unscaled(layer: nn.Module, spec: AdapterSpec) -> None:
    if spec.method == "lora":
        bind(layer, "_merged_weights", lambda self, name, w, b: (
            w + (self.lora_B[name].weight @ self.lora_A[name].weight).detach().float(), b))
    elif spec.method == "dora":  # the merge's delta (and its norm) without the scaling; the forward is right
        bind(layer, "get_delta_weight", lambda self, name: self.lora_B[name].weight @ self.lora_A[name].weight)
    else:  # merge with R instead of R^T
        bind(layer, "_merged_weights", lambda self, name, w, b: (w @ self.get_delta_weight(name).detach().float(), b))


@twin("MERGE-ROUNDTRIP", "unmerge-wrong")
@twin("MERGE-CYCLES", "unmerge-wrong")
def unmerge_wrong(layer: nn.Module, spec: AdapterSpec) -> None:
    if spec.method == "lora":
        bind(layer, "_unmerged_weights", lambda self, name, w, b: (
            w - 0.9 * self.get_delta_weight(name).detach().float(), b))
    elif spec.method == "dora":  # divides by the kept factor, then subtracts 0.9 of the delta
        def unmerged(self: nn.Module, name: str, w: torch.Tensor, b: torch.Tensor | None) -> Any:
            new_w = self._undo(name, w) + 0.1 * self.get_delta_weight(name).detach().float()
            del self._merge_norms[name]
            return new_w, b
        bind(layer, "_unmerged_weights", unmerged)
    else:  # "inverse" = applying the rotation again
        bind(layer, "_unmerged_weights", lambda self, name, w, b: (
            w @ self.get_delta_weight(name).detach().float().t(), b))


@twin("MERGE-WARNS-LORA", "silent-merge")
@twin("MERGE-WARNS-OFT", "silent-merge")
def silent_merge(layer: nn.Module, spec: AdapterSpec) -> None:
    object.__setattr__(layer, "merge_warning", "merged")


@twin("MERGE-TWICE-WARNS", "merges-twice")
def merges_twice(layer: nn.Module, spec: AdapterSpec) -> None:
    bind(layer, "_adapters_to_merge", lambda self, names: list(self.active_adapters if names is None else names))


@twin("MERGE-UNMERGE-NOTHING-WARNS", "unmerge-silent")
def unmerge_silent(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.unmerge
    bind(layer, "unmerge", lambda self: orig() if self.merged else None)


@twin("MERGE-MULTI", "multi-merge-wrong")
def multi_merge_wrong(layer: nn.Module, spec: AdapterSpec) -> None:
    if spec.method == "oft":  # the order PEFT 0.21 uses
        bind(layer, "_merge_order", lambda self, names: names)
    else:
        orig = layer._adapters_to_merge
        bind(layer, "_adapters_to_merge", lambda self, names: orig(names)[:1])


@twin("MERGE-MULTI", "dora-merge-reversed", more=True)
def dora_merge_reversed(layer: nn.Module, spec: AdapterSpec) -> None:
    """DoRA: several adapters merged in the reverse of the forward's order (as if they commuted, as LoRA deltas do):
    ``f_1 (f_2 (W0 + d_2) + d_1)`` where the forward computes ``f_2 (f_1 (W0 + d_1) + d_2)``."""
    if spec.method == "dora":
        bind(layer, "_merge_order", lambda self, names: list(reversed(names)))


@twin("MERGE-SUBSET", "merge-ignores-names")
def merge_ignores_names(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.merge
    bind(layer, "merge", lambda self, safe_merge=False, adapter_names=None: orig(safe_merge))


@twin("MERGE-LORA-BIAS", "bias-unscaled")
def bias_unscaled(layer: nn.Module, spec: AdapterSpec) -> None:
    """PEFT 0.21 bnb layers: b + b_B."""
    orig = layer._merged_weights

    def merged(self: nn.Module, name: str, w: torch.Tensor, b: torch.Tensor | None) -> Any:
        new_w, _ = orig(name, w, b)
        bb = self.lora_B[name].bias
        return new_w, b if bb is None else b + bb.detach().float()
    bind(layer, "_merged_weights", merged)


@twin("MERGE-KEEPS-QUANT-SETTINGS", "default-requant-settings")
def default_requant_settings(layer: nn.Module, spec: AdapterSpec) -> None:
    """Requantize with bnb defaults (nf4, blocksize 64, no double quant) instead of the layer's."""
    def write(base: nn.Module, weight: torch.Tensor) -> None:
        if qlayers.bits_of(base) == 4:
            import bitsandbytes as bnb
            base.weight = bnb.nn.Params4bit(weight.detach().float().contiguous(), requires_grad=False,
                                            module=base).to(base.weight.device)
        else:
            qlayers.requantize(base, weight)
            base.state.threshold = 6.0
    _bind_write(layer, write)


def _bind_write(layer: nn.Module, write: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """Bind a ``_write_base`` that writes the merged weight with ``write(base, weight)`` and the bias as the
    reference does."""
    def write_base(self: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        write(self.base_layer, weight)
        if bias is not None:
            self.base_layer.bias.data = bias.to(self.base_layer.bias.dtype)
    bind(layer, "_write_base", write_base)


def _params4bit(base: nn.Module, data: torch.Tensor, **extra: Any) -> Any:
    import bitsandbytes as bnb

    old = base.weight
    return bnb.nn.Params4bit(data, requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                             quant_type=old.quant_type, quant_storage=old.quant_storage, module=base, **extra)


@twin("MERGE-KEEPS-QUANT-SETTINGS", "requant-from-float32", more=True)
@twin("MERGE-FORWARD-BOUND", "requant-from-float32", more=True)
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


@twin("MERGE-LORA-BIAS", "merged-forward-adds-bias", more=True)
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


@twin("MERGE-FORWARD-BOUND", "leaves-dense-weight", more=True)
@twin("MERGE-ROUNDTRIP", "leaves-dense-weight", more=True)
@twin("MERGE-KEEPS-QUANT-SETTINGS", "leaves-dense-weight", more=True)
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


#: a twin for the harness's malformed-layer report (``suites/test_protocol.py``)
class TransposingMerge(ReferenceImplementation):
    """The merge writes the transposed merged weight back: the layer it leaves is malformed (its base no longer
    has the shape its quant state describes), which the harness reports as what is wrong with it."""

    name = "transposing"
    methods = frozenset({"lora"})
    capabilities = frozenset({"4bit", "unmerge", "safe_merge", "rslora", "input_cast"})

    def create(self, base_layer, spec):  # noqa: ANN001, ANN201
        layer = super().create(base_layer, spec)
        merge = layer.merge

        def transposed(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
            merge(*args, **kwargs)
            b, w = layer.base_layer, layer.base_layer.weight
            dense = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().t().contiguous()
            b.weight = bnb.nn.Params4bit(dense.to(w.quant_state.dtype), requires_grad=False, blocksize=w.blocksize,
                                         quant_type=w.quant_type, module=b).to(w.device)

        layer.merge = transposed
        return layer


@twin("MERGE-FORWARD-BOUND", "dora-wrong-norm", more=True)
def dora_wrong_norm(layer: nn.Module, spec: AdapterSpec) -> None:
    """``conformance.clauses.forward.broken.dora_wrong_norm``: the DoRA norm taken on ``W0`` alone, in the forward
    and the merge alike (MERGE-FORWARD-BOUND sees the unmerged and the merged output off the oracle)."""
    from conformance.clauses.forward.broken import dora_wrong_norm as patch

    patch(layer, spec)


@twin("MERGE-FORWARD-BOUND", "dora-merge-without-magnitude", more=True)
@twin("MERGE-ROUNDTRIP", "dora-merge-without-magnitude", more=True)
@twin("MERGE-CYCLES", "dora-merge-without-magnitude", more=True)
def dora_merge_without_magnitude(layer: nn.Module, spec: AdapterSpec) -> None:
    """DoRA: the merge adds ``s B A`` and forgets the factor ``m / n`` (writes ``W0 + s B A``, as a LoRA merge); the
    unmerge is the reference's (divides by the kept factor, subtracts ``s B A``), so the round trip does not come
    back to ``W0`` either (every cycle of MERGE-CYCLES is such a round trip); the forward is right."""
    if spec.method != "dora":
        return

    def merged(self: nn.Module, name: str, w: torch.Tensor, b: torch.Tensor | None) -> Any:
        delta = self.get_delta_weight(name).detach().float()
        self._merge_norms[name] = torch.linalg.vector_norm(self._unmerged_base_weight() + delta, dim=1)  # for unmerge
        return w + delta, b
    bind(layer, "_merged_weights", merged)


@twin("MERGE-KEEPS-QUANT-SETTINGS", "requant-default-storage-and-threshold", more=True)
def requant_default_storage_and_threshold(layer: nn.Module, spec: AdapterSpec) -> None:
    """Requantize with bitsandbytes' constructor defaults for what the other settings tests do not vary: a 4-bit
    payload back in uint8 storage (bnb_4bit_quant_storage lost), an 8-bit layer with threshold 0 (llm_int8_threshold
    lost) and int8 storage (``Int8Params``' default ``has_fp16_weights=False``: a float16 weight is quantized away).
    Only the bases stored as floats, those with the outlier threshold on and those with ``has_fp16_weights`` can
    see it."""
    def write(base: nn.Module, weight: torch.Tensor) -> None:
        if qlayers.bits_of(base) == 4:
            base.weight = _params4bit(base, weight.detach().to(qlayers.weight_dtype_of(base)).contiguous())
            base.weight = bnb_uint8(base.weight).to(base.weight.device)
        else:
            device = base.weight.device
            data = weight.detach().to(dtype=torch.float16, device="cpu").contiguous()
            base.weight = bnb.nn.Int8Params(data, requires_grad=False).to(device)  # quantizes: int8 storage
            base.state.reset_grads()
            base.state.has_fp16_weights = False
            base.state.threshold = 0.0
    _bind_write(layer, write)


def bnb_uint8(param: Any) -> Any:
    """``param`` (an unquantized ``Params4bit``) set to quantize into uint8 storage."""
    param.quant_storage = torch.uint8
    return param
