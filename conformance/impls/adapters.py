"""AdapterHub's ``adapters`` LoRA over bitsandbytes layers as an implementation under test (``--impl adapters``).

What is tested is the library's own path (adapters 1.3.0 ``src/adapters``): the bnb base layer the check hands
over is put into a tiny transformers model built in-process from a config (a one-layer BERT on the meta device,
no weights downloaded) at ``intermediate.dense``, the linear ``LoRAConfig(intermediate_lora=True)`` targets;
``adapters.init(model)`` then rebuilds that layer as its own ``LoRALinear4bit(LoRALinear, Linear4bit)`` or
``LoRALinear8bitLt(LoRALinear, Linear8bitLt)`` (``methods/lora.py`` ``LoRALinear.wrap``/``copy_from``: the
library's layer *is* the quantized layer and takes over the base's weight, bias and quant state), and
``model.add_adapter(name, config=LoRAConfig(...))`` / ``model.train_adapter(name)`` add and activate the adapter.
Merge, unmerge, activation and deletion are the model's calls (``merge_adapter(name)``, ``reset_adapter()``,
``set_active_adapters``, ``delete_adapter``), which reach the layer's ``merge_adapter``/``reset_adapter``.

``AdaptersLayer`` translates names only:

- ``base_layer`` is the library's ``LoRALinear4bit``/``LoRALinear8bitLt`` itself (it holds the quantized weight
  and the adapters; the object the check passed in is what the library rebuilt, so it is not kept);
- ``adapter_parameters(name)`` returns the library's Parameters: ``lora_A.weight`` is ``loras[name].lora_A``
  (r x in), ``lora_B.weight`` is ``loras[name].lora_B`` (out x r), PEFT's layout (``LoRALinear._get_lora_shapes``);
- ``get_delta_weight(name)`` is the library's composition of ``delta_w`` (``B @ A``) onto a zero weight,
  ``LoRA.com(0, maybe_t(delta_w))`` = ``delta_w * scaling`` with ``scaling = alpha / r`` (``LoRA.__init__``;
  ``composition_mode='add'``, the only mode of ``LoRA``);
- ``merged_adapters`` is ``[layer.merged]`` (the one merged name) or ``[]``; ``active_adapters`` the names of
  the model's active setup.

One convention on state, not behaviour, as for LitGPT: ``init_lora_weights=False`` (the protocol's "random B")
gives ``lora_B`` the values a trained checkpoint would give it, drawn like the library draws ``lora_A``
(``kaiming_uniform_(a=sqrt(5))``); the library's own ``init_weights='lora'`` starts with ``B = 0``.

What the installed release does not have is declared missing with the reason (``AdaptersApi._probe``) and never
filled in; asking for it raises ``ImplementationUnsupported``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import fields
from importlib import metadata
from typing import Any

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported
from conformance.core.vocabulary import ORACLE_METHODS, Capability, Method
from conformance.impls.adapters_model import AdaptersModelEntry
from conformance.impls.library import LibraryImplementation, LibraryLayer, check_lora_params
from conformance.quant.layers import bits_of

INSTALL = ("pip install adapters==1.3.0 transformers==4.57.6 (in a venv of its own: adapters 1.3.0 requires "
           "transformers~=4.57.6; nox -s 'impl(adapters)' builds it)")

#: the protocol's LoRA parameters (the reference's) and the default each takes here
LORA_PARAMS: dict[str, Any] = {
    "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": True, "use_rslora": False,
    "lora_bias": False, "clone_base_output": True,
}
#: where the base goes: the one linear of a one-layer BERT that ``intermediate_lora`` targets (adapters 1.3.0
#: models/bert/mixin_bert.py ``BertLayerAdaptersMixin.init_adapters``: ``intermediate.dense`` -> "intermediate")
SLOT = "encoder.layer.0.intermediate.dense"


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class AdaptersApi:
    """What the installed ``adapters`` offers for bitsandbytes layers, found by feature detection."""

    def __init__(self) -> None:
        self.adapters = _import("adapters")
        self.lora = _import("adapters.methods.lora")
        self.transformers = _import("transformers")
        if self.adapters is None or self.lora is None or self.transformers is None:
            raise ImplementationUnsupported(f"adapters does not import: {INSTALL}")
        try:
            self.version: str = metadata.version("adapters")
        except metadata.PackageNotFoundError:
            self.version = getattr(self.adapters, "__version__", "unknown")
        self.config_fields = {f.name for f in fields(self.adapters.LoRAConfig)}
        self.unsupported: dict[str, str] = {}
        self._probe()

    def __deepcopy__(self, memo: dict) -> AdaptersApi:
        return self  # fixed after the probe; it holds modules (adapters, transformers), which do not copy

    def _gap(self, capability: str, what: str) -> None:
        self.unsupported[capability] = f"adapters {self.version}: {what}"

    def _probe(self) -> None:
        for bits, cls_name in ((4, "LoRALinear4bit"), (8, "LoRALinear8bitLt")):
            if not hasattr(self.lora, cls_name):
                self._gap(f"{bits}bit", f"adapters.methods.lora has no {cls_name} (bitsandbytes not importable?)")
        self._gap("oft", "has no OFT (its methods: bottleneck adapters, prefix/prompt tuning, LoRA/(IA)^3/VeRA, ReFT)")
        if "use_dora" not in self.config_fields:
            self._gap("dora", "LoRAConfig has no use_dora")
        else:
            why = self._dora_on_bnb()
            if why:
                self._gap("dora", why)
        # multi_adapter (several named adapters, one active: add_adapter, set_active_adapters(name), merge_adapter(name),
        # delete_adapter) is the model's; what several active or merged adapters mean is not PEFT's:
        self._gap("additive_adapters", "set_adapter([a, b]) is the model's Stack composition (adapters/composition.py "
                  "parse_composition): sequential, the second LoRA takes the first's output (methods/lora.py "
                  "LoRA.forward, LoRALinear.compose_single), not base + the sum of the deltas")
        self._gap("multi_merge", "one merged LoRA per layer: LoRALinear4bit/LoRALinear8bitLt.merge_adapter raises "
                  "'LoRALayer already has a merged LoRA module. Please reset it first.' for a second name")
        self._gap("active_trainable", "set_active_adapters changes no requires_grad (add_adapter makes the new LoRA's "
                  "tensors trainable whether active or not); the model's train_adapter(name) is the call that freezes "
                  "everything but that adapter (model_mixin.py ModelAdaptersMixin.train_adapter)")
        self._gap("mixed_batch", "LoRALinear.forward(input_states) takes no per-sample adapter names (BatchSplit "
                                 "composition splits by batch sizes)")
        self._gap("disable_adapters", "no switch to disable the adapters: set_active_adapters(None) deactivates by "
                                      "forgetting the active setup, nothing enables it again")
        self._gap("safe_merge", "merge_adapter(name) takes no safe_merge (no check of the merged weights)")
        if "use_rslora" not in self.config_fields:
            self._gap("rslora", "LoRA scales by alpha / r only (LoRAConfig has no use_rslora)")
        if not {"lora_bias", "bias"} & self.config_fields:
            self._gap("lora_bias", "LoRA's B has no bias (LoRAConfig has no lora_bias)")
        if "dropout" not in self.config_fields:
            self._gap("dropout", "LoRAConfig has no dropout")
        # LoRA.forward: `self.lora_dropout(hidden_states) @ torch.t(self.lora_A)`: x as it comes
        self._gap("input_cast", "LoRA.forward multiplies x with lora_A without casting x to the adapter dtype")
        self._gap("prepare", "no counterpart of PEFT's prepare_model_for_kbit_training (train_adapter freezes the "
                             "base only)")
        self._gap("distributed", "not declared: LoRA layers under DistributedDataParallel have not been checked")
        self._gap("dense_twin", "this wrapper builds LoRA over bitsandbytes layers only (the TWIN-* clauses are "
                                "PEFT's and the reference's)")
        for cap in ("init_pissa", "init_pissa_niter", "init_olora", "init_corda", "init_lora_ga", "init_loftq"):
            self._gap(cap, "LoRAConfig.init_weights is 'lora', 'bert', 'ia3' or 'vera': none reads the base")
        self.unsupported["clone_base_output=False"] = (
            f"adapters {self.version}: LoRALinear.forward returns LoRA.com(base_output, delta) = base_output + delta "
            "(a new tensor) and has no switch for an in-place add")

    def _dora_on_bnb(self) -> str | None:
        """Why ``use_dora=True`` does not build on a 4-bit layer through the library (None: it builds)."""
        from conformance.quant.layers import make_base_layer

        try:
            self.build(make_base_layer(64, 64, bits=4), AdapterSpec("lora", "probe", {"r": 2}), use_dora=True)
        except Exception as exc:  # the library's own refusal, whatever it is, is the reason
            return (f"LoRAConfig(use_dora=True) on a bitsandbytes layer raises at add_adapter: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:160]} (LoRALayer.add_adapter passes the packed/int8 weight as w_o; "
                    "docs/findings.md, baselines/conformance/reproducers/adapters_dora_on_bnb.py)")
        return None

    def methods(self) -> frozenset[Method]:
        return frozenset(m for m in ORACLE_METHODS if m not in self.unsupported)

    def capabilities(self) -> frozenset[Capability]:
        return frozenset(c for c in Capability if c not in self.unsupported)

    # -- building ---------------------------------------------------------------------
    def config(self, params: dict[str, Any], dtype: str, use_dora: bool = False,
               attn_matrices: list[str] | None = None) -> tuple[Any, bool]:
        """The ``LoRAConfig`` for the protocol's parameters, and whether B starts random: on the intermediate linear
        only, or (``attn_matrices``, the model entry) on those self-attention projections only."""
        check_lora_params(params, LORA_PARAMS, self.unsupported)
        init = params.get("init_lora_weights", True)
        if not isinstance(init, bool):
            raise ImplementationUnsupported(self.unsupported["init_pissa"] + f" (asked: {init!r})")
        kw: dict[str, Any] = {"r": params.get("r", 8), "alpha": params.get("lora_alpha", 8),
                              "dropout": params.get("lora_dropout", 0.0), "selfattn_lora": False,
                              "intermediate_lora": True, "output_lora": False, "init_weights": "lora", "dtype": dtype}
        if attn_matrices is not None:
            kw.update(selfattn_lora=True, intermediate_lora=False, attn_matrices=list(attn_matrices))
        if use_dora:
            kw["use_dora"] = True
        return self.adapters.LoRAConfig(**kw), init is False

    def tiny_model(self, base_layer: nn.Module) -> nn.Module:
        """A one-layer BERT (meta device: nothing allocated, nothing downloaded) with ``base_layer`` at ``SLOT``."""
        cfg = self.transformers.BertConfig(
            vocab_size=2, hidden_size=base_layer.in_features, intermediate_size=base_layer.out_features,
            num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=2, type_vocab_size=1)
        with torch.device("meta"):
            model = self.transformers.BertModel(cfg, add_pooling_layer=False)
        model.encoder.layer[0].intermediate.dense = base_layer
        return model

    def build(self, base_layer: nn.Module, spec: AdapterSpec, use_dora: bool = False) -> AdaptersLayer:
        if spec.method not in ("lora", "dora"):
            raise ImplementationUnsupported(self.unsupported.get(spec.method, f"unknown method {spec.method!r}"))
        if spec.method == "dora" and "dora" in self.unsupported:
            raise ImplementationUnsupported(self.unsupported["dora"])
        bits = bits_of(base_layer)  # a bnb Linear4bit/Linear8bitLt, or a one-line error
        if f"{bits}bit" in self.unsupported:
            raise ImplementationUnsupported(self.unsupported[f"{bits}bit"])
        config, random_b = self.config(dict(spec.params), spec.dtype, use_dora or spec.method == "dora")
        model = self.tiny_model(base_layer)
        self.adapters.init(model)
        model.add_adapter(spec.adapter_name, config=config)
        model.train_adapter(spec.adapter_name)
        if random_b:
            random_b_for(model, spec.adapter_name)
        return AdaptersLayer(self, model, spec.dtype)


class AdaptersLayer(LibraryLayer):
    """Protocol names for the library's ``LoRALinear4bit``/``LoRALinear8bitLt`` (``self.layer``) and its model.

    The model is kept outside the module tree (it holds the layer; its other modules are meta tensors), so the
    parameters, buffers and state dict of this wrapper are the library layer's."""

    def __init__(self, api: AdaptersApi, model: nn.Module, dtype: str, path: str = SLOT) -> None:
        super().__init__()
        self.layer = model.get_submodule(path)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "_api", api)
        self._dtype = dtype

    def _refuse(self, capability: str) -> None:
        raise ImplementationUnsupported(self._api.unsupported[capability])

    # -- merge ------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        if safe_merge:
            self._refuse("safe_merge")
        for name in self.active_adapters if adapter_names is None else list(adapter_names):
            self.model.merge_adapter(name)

    def unmerge(self) -> None:
        self.model.reset_adapter()

    @property
    def merged_adapters(self) -> list[str]:
        return [self.layer.merged] if self.layer.merged else []

    def get_delta_weight(self, name: str) -> torch.Tensor:
        lora = self.layer.loras[name]
        delta = self.layer.maybe_t(lora.delta_w)
        return lora.com(torch.zeros_like(delta), delta)

    # -- adapters ---------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, **params: Any) -> None:
        config, random_b = self._api.config(params, self._dtype)
        self.model.add_adapter(adapter_name, config=config)
        if random_b:
            random_b_for(self.model, adapter_name)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        self.model.set_active_adapters(adapter_names if isinstance(adapter_names, str) else list(adapter_names))

    def delete_adapter(self, adapter_name: str) -> None:
        self.model.delete_adapter(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return _names(self.model.active_adapters)

    @property
    def active_adapter(self) -> str | None:
        names = self.active_adapters
        return names[0] if len(names) == 1 else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.layer.loras.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The library's own Parameters (not copies): lora_A (r x in), lora_B (out x r)."""
        lora = self.layer.loras[name]
        return {"lora_A.weight": lora.lora_A, "lora_B.weight": lora.lora_B}

    # -- base layer -------------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        """The library's layer itself: a subclass of the bnb layer holding the quantized weight (read fresh: its
        merge replaces the weight Parameter)."""
        return self.layer

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    def extra_repr(self) -> str:
        return f"adapters {self._api.version}, adapters {self.adapter_names}"


def random_b_for(model: nn.Module, name: str) -> None:
    """The protocol's ``init_lora_weights=False``: every ``lora_B`` of adapter ``name`` drawn like ``lora_A``."""
    with torch.no_grad():
        for module in model.modules():
            loras = getattr(module, "loras", None)
            if isinstance(loras, nn.ModuleDict) and name in loras:
                nn.init.kaiming_uniform_(loras[name].lora_B, a=math.sqrt(5))


def _names(setup: Any) -> list[str]:
    """The adapter names of an adapters composition block (``Stack``, ...), in order; [] for None."""
    if setup is None:
        return []
    if isinstance(setup, str):
        return [setup]
    out: list[str] = []
    for child in setup.children:
        out += _names(child)
    return out


class AdaptersImplementation(LibraryImplementation):
    """The installed ``adapters``' LoRA over bitsandbytes layers (see the module docstring)."""

    name = "adapters"
    api_class = AdaptersApi

    @property
    def model(self) -> AdaptersModelEntry:
        """The model-level entry (capability ``model``): ``adapters.init`` on the whole model."""
        return AdaptersModelEntry(self._api)
