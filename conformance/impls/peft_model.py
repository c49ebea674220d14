"""PEFT's model-level entry (capability ``model``): what users call on a whole transformers model.

``attach``: ``peft.get_peft_model(model, config)`` with the protocol's parameters mapped onto PEFT's config (as the
layer wrapper maps them, ``PeftApi.config``) and ``target_modules`` set; ``adapter_layers``: every ``BaseTunerLayer``
of the ``PeftModel`` wrapped as a protocol layer (``PeftAdapterLayer``), named as in the base model (PEFT's
``base_model.model.`` prefix taken off); ``merge_and_unload``: ``PeftModel.merge_and_unload()``; ``save_adapter``:
``PeftModel.save_pretrained(path)``; ``load_adapter``: ``PeftModel.from_pretrained(model, path)``; ``add_adapter``:
``PeftModel.add_adapter(name, config)``; ``set_adapter``: ``PeftModel.set_adapter(name)``; ``disabled``:
``PeftModel.disable_adapter()`` (a context manager); ``delete_adapter``: ``PeftModel.delete_adapter(name)``;
``prepare``: ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=...,
gradient_checkpointing_kwargs=...)``.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from conformance.impls.peft import PeftApi

PREFIX = "base_model.model."


class PeftModelEntry:
    def __init__(self, api: PeftApi) -> None:
        self.api = api

    def _config(self, targets: list[str], spec: Any) -> Any:
        config = self.api.config(spec.method, dict(spec.params))
        config.target_modules = list(targets)
        return config

    def attach(self, model: nn.Module, targets: list[str], spec: Any) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.api.peft.get_peft_model(model, self._config(targets, spec), adapter_name=spec.adapter_name)

    def add_adapter(self, adapted: nn.Module, targets: list[str], spec: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted.add_adapter(spec.adapter_name, self._config(targets, spec))

    def set_adapter(self, adapted: nn.Module, name: str) -> None:
        adapted.set_adapter(name)

    def disabled(self, adapted: nn.Module) -> AbstractContextManager[Any]:
        return adapted.disable_adapter()

    def delete_adapter(self, adapted: nn.Module, name: str) -> None:
        adapted.delete_adapter(name)

    def prepare(self, model: nn.Module, gradient_checkpointing: dict[str, Any] | None = None) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.api.peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing is not None,
                gradient_checkpointing_kwargs=gradient_checkpointing)

    @staticmethod
    def _method(adapted: nn.Module) -> str:
        configs = getattr(adapted, "peft_config", None) or {}
        config = next(iter(configs.values()), None)
        if config is None:
            return "lora"
        if type(config).__name__ == "OFTConfig":
            return "oft"
        return "dora" if getattr(config, "use_dora", False) else "lora"

    def adapter_layers(self, adapted: nn.Module) -> dict[str, nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        from conformance.impls.peft import PeftAdapterLayer

        method = self._method(adapted)
        return {(n[len(PREFIX):] if n.startswith(PREFIX) else n): PeftAdapterLayer(m, method, self.api)
                for n, m in adapted.named_modules() if isinstance(m, BaseTunerLayer)}

    def merge_and_unload(self, adapted: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return adapted.merge_and_unload()

    def save_adapter(self, adapted: nn.Module, path: str) -> None:
        adapted.save_pretrained(path)

    def load_adapter(self, model: nn.Module, path: str) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.api.peft.PeftModel.from_pretrained(model, path)
