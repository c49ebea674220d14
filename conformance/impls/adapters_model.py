"""adapters' model-level entry (capability ``model``): what users call on a whole transformers model.

adapters 1.3.0 ``src/adapters/wrappers/model.py init`` and ``src/adapters/model_mixin.py``: ``attach`` is
``adapters.init(model)`` (which rebuilds every self-attention and MLP linear as the library's ``LoRALinear*``), then
``model.add_adapter(name, config=LoRAConfig(selfattn_lora=True, attn_matrices=[...]))`` and
``model.train_adapter(name)``; ``adapter_layers`` every rebuilt layer that holds a LoRA, as an ``AdaptersLayer``, by
its name in the base model (``init`` replaces modules in place, so the names do not change); ``merge_and_unload``:
``model.merge_adapter(name)`` then ``model.delete_adapter(name)`` for each adapter (adapters has no unload: the merged
layers stay the library's bnb subclasses, without LoRA modules); ``save_adapter``: ``model.save_adapter(path,
name)``; ``load_adapter``: ``adapters.init(model)``, ``model.load_adapter(path)``, ``set_active_adapters``;
``add_adapter`` / ``set_adapter`` / ``delete_adapter``: the model's ``add_adapter`` / ``set_active_adapters`` /
``delete_adapter``.

adapters targets LoRA by location, not by module name: self-attention ``q``/``k``/``v`` (``attn_matrices``), the MLP
(``intermediate_lora``/``output_lora``, per model family). Targets other than ``q_proj``/``k_proj``/``v_proj`` are
refused with the reason. No disable switch (``disable_adapters`` is not declared, ``disabled`` refuses) and no
``prepare`` counterpart.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from torch import nn

from conformance.clauses.interface import ImplementationUnsupported

if TYPE_CHECKING:
    from conformance.impls.adapters import AdaptersApi, AdaptersLayer

#: the protocol's target names and adapters' ``attn_matrices`` key for each (models/llama/mixin_llama.py and the
#: other decoder mixins: ``q_proj``/``k_proj``/``v_proj`` wrapped with ``attn_key`` "q"/"k"/"v")
ATTN: dict[str, str] = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}


class AdaptersModelEntry:
    def __init__(self, api: AdaptersApi) -> None:
        self.api = api

    def _config(self, targets: list[str], spec: Any) -> tuple[Any, bool]:
        other = [t for t in targets if t not in ATTN]
        if other:
            raise ImplementationUnsupported(
                f"adapters {self.api.version}: LoRAConfig targets by location (self-attention q/k/v through "
                f"attn_matrices, the MLP through intermediate_lora/output_lora), not by module name: {other}")
        if spec.method != "lora":
            raise ImplementationUnsupported(self.api.unsupported.get(spec.method, f"unknown method {spec.method!r}"))
        return self.api.config(dict(spec.params), spec.dtype, attn_matrices=[ATTN[t] for t in targets])

    def attach(self, model: nn.Module, targets: list[str], spec: Any) -> nn.Module:
        from conformance.impls.adapters import random_b_for

        config, random_b = self._config(targets, spec)
        self.api.adapters.init(model)
        model.add_adapter(spec.adapter_name, config=config)
        model.train_adapter(spec.adapter_name)
        if random_b:
            random_b_for(model, spec.adapter_name)
        return model

    def add_adapter(self, adapted: nn.Module, targets: list[str], spec: Any) -> None:
        from conformance.impls.adapters import random_b_for

        config, random_b = self._config(targets, spec)
        adapted.add_adapter(spec.adapter_name, config=config)
        if random_b:
            random_b_for(adapted, spec.adapter_name)

    def trainer_class(self) -> type:
        """``adapters.AdapterTrainer`` (adapters 1.3.0 ``src/adapters/trainer.py``), what the library trains with."""
        return self.api.adapters.AdapterTrainer

    def set_adapter(self, adapted: nn.Module, name: str) -> None:
        adapted.set_active_adapters(name)

    def disabled(self, adapted: nn.Module) -> AbstractContextManager[Any]:
        raise ImplementationUnsupported(self.api.unsupported["disable_adapters"])

    def delete_adapter(self, adapted: nn.Module, name: str) -> None:
        adapted.delete_adapter(name)

    def adapter_layers(self, adapted: nn.Module) -> dict[str, AdaptersLayer]:
        from conformance.impls.adapters import AdaptersLayer

        out = {}
        for n, m in adapted.named_modules():
            loras = getattr(m, "loras", None)
            if isinstance(loras, nn.ModuleDict) and len(loras):
                dtype = str(next(iter(loras.values())).lora_A.dtype).removeprefix("torch.")
                out[n] = AdaptersLayer(self.api, adapted, dtype, n)
        return out

    def merge_and_unload(self, adapted: nn.Module) -> nn.Module:
        for name in list(adapted.adapters_config.adapters):
            adapted.merge_adapter(name)
            adapted.delete_adapter(name)
        return adapted

    def save_adapter(self, adapted: nn.Module, path: str) -> None:
        for name in list(adapted.adapters_config.adapters):
            adapted.save_adapter(path, name)

    def load_adapter(self, model: nn.Module, path: str) -> nn.Module:
        self.api.adapters.init(model)
        name = model.load_adapter(path)
        model.set_active_adapters(name)
        return model
