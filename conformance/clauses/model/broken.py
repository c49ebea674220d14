"""Broken twins of the model clauses: the reference with one bug each, in a layer or in its model-level entry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conformance.clauses.broken import Broken, twin
from conformance.clauses.interface import AdapterSpec
from conformance.quant import layers as qlayers
from conformance.reference.model import ADAPTER_FILE, ReferenceModelEntry

#: one broken twin per clause of the area (``@twin`` or ``BrokenEntry``)
BROKEN: dict[str, Broken] = {}
#: further (clause, twin) pairs
MORE: list[tuple[str, Broken]] = []


@twin("MODEL-ATTACH", "attach-random-b")
def attach_random_b(layer: nn.Module, spec: AdapterSpec) -> None:
    """LoRA's B starts random instead of zero (an init_lora_weights=False default)."""
    if spec.method == "lora":
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen).to(b.weight) * 0.01)


class _Wrapper(nn.Module):
    """A wrapper that passes the forward through and casts like any ``nn.Module`` (as ``PeftModel`` does)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


class _Entry(ReferenceModelEntry):
    bug = ""

    def merge_and_unload(self, adapted: nn.Module) -> nn.Module:
        names = sorted(self.adapter_layers(adapted))
        if self.bug == "leave-one":  # the last adapted module is merged but stays wrapped
            adapted.get_submodule(names[-1]).merge()
            keep = adapted.get_submodule(names[-1])
            out = super().merge_and_unload(adapted)
            head, _, leaf = names[-1].rpartition(".")
            setattr(out.get_submodule(head), leaf, keep)
            return out
        out = super().merge_and_unload(adapted)
        if self.bug == "wrong-module":  # the first two modules get each other's merged weight
            a, b = out.get_submodule(names[0]), out.get_submodule(names[1])
            a.weight, b.weight = b.weight, a.weight
        if self.bug == "in-memory":  # the merged weight lives in the forward only; the payload stays unmerged
            first = out.get_submodule(names[0])
            w = qlayers.dequantize(first)
            first.weight = first._pre_merge_weight
            bias = first.bias

            def forward(x: torch.Tensor, w: torch.Tensor = w, bias: Any = bias) -> torch.Tensor:
                return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
            first.forward = forward
        return out

    def prepare(self, model: nn.Module, gradient_checkpointing: dict[str, Any] | None = None) -> nn.Module:
        out = super().prepare(model, gradient_checkpointing)
        if self.bug == "cast-payload":  # every parameter to float32, the quantized payloads too
            for p in out.parameters():
                p.data = p.data.to(torch.float32)
        if self.bug == "no-input-grads" and gradient_checkpointing is not None:  # the embeddings' hook removed
            out.disable_input_require_grads()
        return out

    def attach(self, model: nn.Module, targets: list[str], spec: Any) -> nn.Module:
        out = super().attach(model, targets, spec)
        if self.bug == "norms-trainable":  # the layer norms left trainable next to the adapter
            for n, p in out.named_parameters():
                if "norm" in n:
                    p.requires_grad_(True)
        if self.bug == "frozen-adapter":  # the adapter's tensors frozen
            for layer in self.adapter_layers(out).values():
                for t in layer.adapter_parameters(spec.adapter_name).values():
                    t.requires_grad_(False)
        if self.bug == "bypass":  # a plain nn.Module wrapper: its .to/.half/.float skip transformers' refusals
            return _Wrapper(out)
        if self.bug == "in-memory":
            for layer in self.adapter_layers(out).values():  # kept outside the module's parameters
                object.__setattr__(layer.base_layer, "_pre_merge_weight", layer.base_layer.weight)
        return out

    def save_adapter(self, adapted: nn.Module, path: str) -> None:
        super().save_adapter(adapted, path)
        if self.bug == "drop-tensor":  # one module's B is saved as zeros
            from safetensors.torch import load_file, save_file

            f = str(Path(path) / ADAPTER_FILE)
            saved = load_file(f)
            key = sorted(k for k in saved if k.endswith("lora_B.weight") or k.endswith("oft_R.weight"))[-1]
            saved[key] = torch.zeros_like(saved[key])
            save_file(saved, f)


    def set_adapter(self, adapted: nn.Module, name: str) -> None:
        if self.bug != "set-adds":
            return super().set_adapter(adapted, name)
        for layer in self.adapter_layers(adapted).values():  # activates name next to the active ones
            layer.set_adapter(list(dict.fromkeys([*layer.active_adapters, name])))
        return None

    @contextmanager
    def disabled(self, adapted: nn.Module) -> Iterator[None]:
        with super().disabled(adapted):
            if self.bug == "disable-skips-one":  # the last adapted module stays enabled
                last = self.adapter_layers(adapted)[sorted(self.adapter_layers(adapted))[-1]]
                last.enable_adapters(True)
            yield

    def delete_adapter(self, adapted: nn.Module, name: str) -> None:
        if self.bug != "delete-deactivates":
            return super().delete_adapter(adapted, name)
        for layer in self.adapter_layers(adapted).values():  # taken off the active list, its tensors kept
            layer.active_adapters = [n for n in layer.active_adapters if n != name]
        return None


class BrokenEntry(Broken):
    """The reference whose model-level entry has ``bug``."""

    def __init__(self, name: str, bug: str) -> None:
        super().__init__(name)
        self.bug = bug

    @property
    def model(self) -> ReferenceModelEntry:
        entry = _Entry(self.create, AdapterSpec)
        entry.bug = self.bug
        return entry


BROKEN["MODEL-MERGE-UNLOAD"] = BrokenEntry("merge-into-wrong-module", "wrong-module")
MORE.append(("MODEL-MERGE-UNLOAD", BrokenEntry("unload-leaves-an-adapter", "leave-one")))
BROKEN["MODEL-SAVE-ADAPTER"] = BrokenEntry("save-drops-a-tensor", "drop-tensor")
BROKEN["MODEL-SAVE-MERGED"] = BrokenEntry("merged-weight-only-in-memory", "in-memory")
BROKEN["MODEL-SET-ADAPTER"] = BrokenEntry("set-adapter-adds", "set-adds")
BROKEN["MODEL-DISABLE"] = BrokenEntry("disable-skips-a-module", "disable-skips-one")
BROKEN["MODEL-DELETE-ADAPTER"] = BrokenEntry("delete-only-deactivates", "delete-deactivates")
BROKEN["MODEL-DTYPE-MOVE"] = BrokenEntry("wrapper-bypasses-the-refusal", "bypass")
BROKEN["MODEL-PREPARE"] = BrokenEntry("prepare-casts-the-payload", "cast-payload")
MORE.append(("MODEL-PREPARE", BrokenEntry("attach-leaves-norms-trainable", "norms-trainable")))
BROKEN["MODEL-GRAD-CHECKPOINT"] = BrokenEntry("checkpointing-without-input-grads", "no-input-grads")
BROKEN["MODEL-FIRST-STEPS"] = BrokenEntry("adapter-frozen-at-attach", "frozen-adapter")
