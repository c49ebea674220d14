"""The reference's model-level entry: its layers attached to a whole model by target module names.

What PEFT's ``get_peft_model`` / ``merge_and_unload`` / ``save_pretrained`` / ``PeftModel.from_pretrained`` do, kept
small: ``attach`` replaces each target ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` (a module whose qualified name
ends in a target) with the layer ``create`` builds over it, in place; ``merge_and_unload`` merges each one (dequantize,
apply, requantize with the base's settings) and puts its base layer back; the adapter is saved as
``adapter.safetensors`` (every adapter tensor, ``<module>.<tensor>``) next to ``adapter.json`` (method, parameters,
targets, adapter name) and loaded by attaching that spec and copying the tensors in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from conformance.quant import layers as qlayers

from .adapter_layer import QuantAdapterLayer

ADAPTER_FILE = "adapter.safetensors"
SPEC_FILE = "adapter.json"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, leaf = name.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


class ReferenceModelEntry:
    """``attach`` / ``adapter_layers`` / ``merge_and_unload`` / ``save_adapter`` / ``load_adapter`` over the layers
    ``create(base, spec)`` builds (the implementation's own ``create``: a broken twin's patches reach them too)."""

    def __init__(self, create: Callable[[nn.Module, Any], nn.Module], spec_type: Callable[..., Any]) -> None:
        self.create = create
        self.spec_type = spec_type  # the protocol's AdapterSpec (read back from adapter.json)

    def attach(self, model: nn.Module, targets: list[str], spec: Any) -> nn.Module:
        names = [n for n, m in model.named_modules()
                 if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and qlayers.is_quantized(m)
                 and any(n == t or n.endswith("." + t) for t in targets)]
        if not names:
            raise ValueError(f"no bitsandbytes layer of the model matches the targets {targets}")
        for name in names:
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, self.create(getattr(parent, leaf), spec))
        model._conformance_adapter = {"spec": spec, "targets": list(targets)}  # what save_adapter writes
        return model

    def adapter_layers(self, adapted: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in adapted.named_modules() if isinstance(m, QuantAdapterLayer)}

    def merge_and_unload(self, adapted: nn.Module) -> nn.Module:
        for name, layer in self.adapter_layers(adapted).items():
            if not layer.merged:
                layer.merge()
            parent, leaf = _parent(adapted, name)
            setattr(parent, leaf, layer.base_layer)
        adapted.__dict__.pop("_conformance_adapter", None)
        return adapted

    def save_adapter(self, adapted: nn.Module, path: str) -> None:
        from safetensors.torch import save_file

        meta = adapted.__dict__.get("_conformance_adapter")
        if meta is None:
            raise ValueError("the model has no adapter attached by this entry (attach() first)")
        spec = meta["spec"]
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}.{k}": t.detach().cpu().contiguous()
                   for n, layer in self.adapter_layers(adapted).items()
                   for k, t in layer.adapter_parameters(spec.adapter_name).items()}
        save_file(tensors, str(out / ADAPTER_FILE))
        (out / SPEC_FILE).write_text(json.dumps({"spec": asdict(spec), "targets": meta["targets"]}, indent=1))

    def load_adapter(self, model: nn.Module, path: str) -> nn.Module:
        from safetensors.torch import load_file

        where = Path(path)
        meta = json.loads((where / SPEC_FILE).read_text())
        spec = self.spec_type(**meta["spec"])
        adapted = self.attach(model, meta["targets"], spec)
        saved = load_file(str(where / ADAPTER_FILE))
        with torch.no_grad():
            for n, layer in self.adapter_layers(adapted).items():
                for k, t in layer.adapter_parameters(spec.adapter_name).items():
                    t.copy_(saved[f"{n}.{k}"].to(t.device))
        return adapted
