"""The reference's model-level entry: its layers attached to a whole model by target module names.

What PEFT's ``get_peft_model`` / ``merge_and_unload`` / ``save_pretrained`` / ``PeftModel.from_pretrained`` do, kept
small: ``attach`` replaces each target ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` (a module whose qualified name
ends in a target) with the layer ``create`` builds over it, in place; ``merge_and_unload`` merges each one (dequantize,
apply, requantize with the base's settings) and puts its base layer back; the adapter is saved as
``adapter.safetensors`` (every adapter tensor, ``<module>.<tensor>``) next to ``adapter.json`` (method, parameters,
targets, adapter name) and loaded by attaching that spec and copying the tensors in. ``add_adapter`` /
``set_adapter`` / ``disabled`` / ``delete_adapter`` apply the layers' own calls to every adapted module.

An attached model is marked the way transformers marks a model with adapters injected in place
(``_hf_peft_config_loaded``, set by ``integrations/peft.py PeftAdapterMixin.add_adapter``), which is what
``Trainer`` reads to tell a model with trainable adapters from a purely quantized one
(``trainer_utils.py validate_quantization_for_training``, transformers 5.x; inline in ``Trainer.__init__`` in 4.x);
libraries outside PEFT that train with ``Trainer`` set the same flag (ms-swift ``swift/trainers/mixin.py``).
``merge_and_unload`` takes the mark off again (``save_pretrained`` of a marked model writes adapters only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
#: transformers' mark of a model with adapters injected in place (read by Trainer's quantized-model check)
ADAPTERS_MARK = "_hf_peft_config_loaded"
#: the quantized payloads ``prepare`` never casts
QUANTIZED_PARAMS = (bnb.nn.Params4bit, bnb.nn.Int8Params)


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
        for p in model.parameters():  # only the adapter trains (PEFT: BaseTuner._mark_only_adapters_as_trainable)
            p.requires_grad_(False)
        for name in names:
            parent, leaf = _parent(model, name)
            layer = self.create(getattr(parent, leaf), spec)
            for t in layer.adapter_parameters(spec.adapter_name).values():
                t.requires_grad_(t.is_floating_point())
            setattr(parent, leaf, layer)
        model._conformance_adapter = {"specs": {spec.adapter_name: spec}, "active": spec.adapter_name,
                                      "targets": list(targets)}  # what save_adapter writes
        setattr(model, ADAPTERS_MARK, True)
        return model

    def _meta(self, adapted: nn.Module) -> dict[str, Any]:
        meta = adapted.__dict__.get("_conformance_adapter")
        if meta is None:
            raise ValueError("the model has no adapter attached by this entry (attach() first)")
        return meta

    def add_adapter(self, adapted: nn.Module, targets: list[str], spec: Any) -> None:
        meta = self._meta(adapted)
        if sorted(targets) != sorted(meta["targets"]):
            raise ValueError(f"a further adapter goes on the attached targets {meta['targets']}, not {targets}")
        for layer in self.adapter_layers(adapted).values():
            layer.add_adapter(spec.adapter_name, **dict(spec.params))
            for p in layer.adapter_parameters(spec.adapter_name).values():
                if p.is_floating_point():
                    p.data = p.data.to(spec.torch_dtype)
        meta["specs"][spec.adapter_name] = spec

    def set_adapter(self, adapted: nn.Module, name: str) -> None:
        for layer in self.adapter_layers(adapted).values():
            layer.set_adapter(name)
        self._meta(adapted)["active"] = name

    @contextmanager
    def disabled(self, adapted: nn.Module) -> Iterator[None]:
        layers = list(self.adapter_layers(adapted).values())
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def prepare(self, model: nn.Module, gradient_checkpointing: dict[str, Any] | None = None) -> nn.Module:
        """What PEFT's ``prepare_model_for_kbit_training`` does for a bitsandbytes model, written out: freeze every
        parameter, cast float16/bfloat16 parameters that are not quantized payloads to float32 (layer norms, the
        embeddings, the head), and with ``gradient_checkpointing`` turn transformers' checkpointing on with those
        kwargs and make the input embeddings' output require grad (reentrant checkpointing passes no gradient into
        a segment whose inputs do not require it: the adapters inside would get none)."""
        for p in model.parameters():
            p.requires_grad_(False)
            if p.dtype in (torch.float16, torch.bfloat16) and not isinstance(p, QUANTIZED_PARAMS):
                p.data = p.data.to(torch.float32)
        if gradient_checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(gradient_checkpointing))
            if getattr(model, "_require_grads_hook", None) is None:  # transformers 5.x registers it itself above
                model.enable_input_require_grads()
        return model

    def delete_adapter(self, adapted: nn.Module, name: str) -> None:
        for layer in self.adapter_layers(adapted).values():
            layer.delete_adapter(name)
        meta = self._meta(adapted)
        meta["specs"].pop(name, None)

    def adapter_layers(self, adapted: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in adapted.named_modules() if isinstance(m, QuantAdapterLayer)}

    def merge_and_unload(self, adapted: nn.Module) -> nn.Module:
        for name, layer in self.adapter_layers(adapted).items():
            if not layer.merged:
                layer.merge()
            parent, leaf = _parent(adapted, name)
            setattr(parent, leaf, layer.base_layer)
        adapted.__dict__.pop("_conformance_adapter", None)
        if ADAPTERS_MARK in adapted.__dict__:
            delattr(adapted, ADAPTERS_MARK)
        return adapted

    def save_adapter(self, adapted: nn.Module, path: str) -> None:
        from safetensors.torch import save_file

        meta = self._meta(adapted)
        spec = meta["specs"][meta["active"]]
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
