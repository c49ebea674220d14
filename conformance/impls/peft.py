"""The installed PEFT as an implementation under test (``--impl peft``).

``PeftImplementation.create`` builds PEFT's *own* layer over the bitsandbytes base and returns a
thin ``nn.Module`` wrapper (``PeftAdapterLayer``) that only translates the API to the protocol in
``conformance.clauses.interface``: every call goes straight to PEFT, nothing is validated,
fixed or re-computed here, so whatever PEFT does differently shows up in the clause results.

Version awareness is by feature, not by version number:

- LoRA on bnb (``peft/tuners/lora/bnb.py``): ``Linear4bit(base, name, config: LoraConfig, r,
  lora_alpha)`` since PEFT 0.19; the hyper-parameters as keyword arguments (``r, lora_alpha,
  lora_dropout, init_lora_weights, use_rslora, use_dora, lora_bias``) before. ``update_layer``
  changed the same way; both are detected from their signatures.
- OFT on bnb: PEFT 0.21 uses the generic ``oft.layer.Linear`` with a quantization backend
  (``peft/utils/quantization_utils.py``, ``Bnb4bitBackend``/``Bnb8bitBackend``); 0.16-0.20 had
  ``peft/tuners/oft/bnb.py`` (``Linear4bit``/``Linear8bitLt``; keyword hyper-parameters up to
  0.18/0.19, ``config: OFTConfig`` after); 0.15 and older have no OFT for bitsandbytes at all
  (and a different parametrisation, ``oft_r`` full blocks plus ``oft_s``), so ``oft`` is dropped
  with the reason in ``unsupported``.

Parameters a check does not pass take the protocol's defaults (the reference constructors'
defaults, ``conformance.reference.LoraConfig``/``OftConfig``), not PEFT's config defaults: e.g.
PEFT's ``OFTConfig`` defaults to ``oft_block_size=32`` and ``use_cayley_neumann=True``, which a
check asking for ``r=4`` (and nothing else) must not get.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from torch import nn

from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported
from conformance.core.inits import LOFTQ_WEIGHT, Init, of_value
from conformance.core.vocabulary import LORA_LIKE, ORACLE_METHODS, TWIN_METHODS, Capability, Method
from conformance.impls.library import LibraryImplementation
from conformance.impls.peft_inits import InitApi
from conformance.impls.peft_model import PeftModelEntry
from conformance.impls.peft_tuners import OtherTuners, PeftLayer, TunerApi, inject
from conformance.quant.layers import bits_of, is_dense
from conformance.reference.lora import LoraConfig as _RefLoraConfig
from conformance.reference.oft import OftConfig as _RefOftConfig

LORA_PARAMS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(_RefLoraConfig)
}
OFT_PARAMS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(_RefOftConfig)}
CLONE_MSG = (
    "PEFT always clones the 4-bit base output before adding LoRA (peft/tuners/lora/bnb.py, "
    "'As per Tim Dettmers ... defensively clone') and has no switch to turn that off; "
    "clone_base_output=False cannot be expressed with PEFT"
)


def _has_param(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class PeftApi:
    """What the installed PEFT offers for bitsandbytes layers, found by feature detection."""

    def __init__(self) -> None:
        self.peft = _import("peft")
        if self.peft is None:
            raise ImplementationUnsupported("peft is not installed: pip install peft (0.15 or newer)")
        self.version: str = getattr(self.peft, "__version__", "unknown")
        self.unsupported: dict[str, str] = {}
        #: capability -> {method: why it does not hold for that method}
        self.limitations: dict[Capability, dict[Method, str]] = {}
        self.lora_classes: dict[int, type] = {}
        self.oft_classes: dict[int, type] = {}
        self.lora_config_api = False
        self.oft_config_api = False
        self.oft_style = ""  # "backend" (0.21+), "bnb" (0.16-0.20) or "" (none)
        self._probe_lora()
        self._probe_oft()
        self._probe_dora()
        self._probe_layer_features()
        #: the methods judged against their dense twin (``conformance.impls.peft_tuners``)
        self.tuners = TunerApi(self.peft, self.version)
        #: every other tuner of the installed release that targets nn.Linear (refuse or work only; found lazily)
        self.others = OtherTuners(self.peft, self.version, frozenset(m.value for m in Method))
        self.unsupported.update(self.tuners.unsupported)
        #: LoRA initializations that read the base (``conformance.impls.peft_inits``)
        self.inits = InitApi(self.peft, self.version)
        self.unsupported.update(self.inits.unsupported)
        for cap, per_method in self.tuners.limitations.items():
            self.limitations.setdefault(cap, {}).update(per_method)

    # -- LoRA -------------------------------------------------------------------------
    def _probe_lora(self) -> None:
        mod = _import("peft.tuners.lora.bnb")
        if mod is None:
            self.unsupported["lora"] = f"peft {self.version}: peft.tuners.lora.bnb does not import (bitsandbytes?)"
            return
        for bits, cls_name in ((4, "Linear4bit"), (8, "Linear8bitLt")):
            cls = getattr(mod, cls_name, None)
            if cls is not None:
                self.lora_classes[bits] = cls
        if not self.lora_classes:
            self.unsupported["lora"] = f"peft {self.version}: peft.tuners.lora.bnb has no Linear4bit/Linear8bitLt"
            return
        cls = next(iter(self.lora_classes.values()))
        self.lora_config_api = _has_param(cls.__init__, "config")
        if self.lora_config_api:
            fields = {f.name for f in dataclasses.fields(self.peft.LoraConfig)}
            has_bias = "lora_bias" in fields
        else:
            has_bias = _has_param(cls.__init__, "lora_bias")
        if not has_bias:
            self.unsupported["lora_bias"] = f"peft {self.version}: LoRA bnb layers take no lora_bias (added in 0.14)"
        if not hasattr(cls, "_mixed_batch_forward"):
            self.unsupported["mixed_batch"] = f"peft {self.version}: LoRA bnb layers have no _mixed_batch_forward"

    # -- OFT --------------------------------------------------------------------------
    def _probe_oft(self) -> None:
        layer_mod = _import("peft.tuners.oft.layer")
        if layer_mod is None or not hasattr(layer_mod, "OFTRotationModule"):
            self.unsupported["oft"] = (
                f"peft {self.version}: OFT has no OFTRotationModule (the oft_R.weight upper-triangle layout, PEFT "
                ">= 0.16) and no OFT layer for bitsandbytes (peft/tuners/oft/bnb.py appeared in 0.16; 0.21 uses "
                "quantization backends); its OFT (oft_r full blocks + oft_s) cannot run on bnb layers"
            )
            return
        qutils = _import("peft.utils.quantization_utils")
        linear = getattr(layer_mod, "Linear", None)
        if (
            qutils is not None and hasattr(qutils, "Bnb4bitBackend") and linear is not None
            and hasattr(layer_mod, "resolve_quantization_backend")  # OFTLayer.__init__ resolves a backend
        ):
            self.oft_style = "backend"
            self.oft_classes = {4: linear, 8: linear}
            self.oft_config_api = _has_param(linear.__init__, "config")
        else:
            bnb_mod = _import("peft.tuners.oft.bnb")
            if bnb_mod is None:
                self.unsupported["oft"] = (
                    f"peft {self.version}: no OFT layer for bitsandbytes (neither peft/tuners/oft/bnb.py nor "
                    "a quantization backend for oft.layer.Linear)"
                )
                return
            self.oft_style = "bnb"
            for bits, cls_name in ((4, "Linear4bit"), (8, "Linear8bitLt")):
                cls = getattr(bnb_mod, cls_name, None)
                if cls is not None:
                    self.oft_classes[bits] = cls
            if not self.oft_classes:
                self.unsupported["oft"] = f"peft {self.version}: peft.tuners.oft.bnb has no Linear4bit/Linear8bitLt"
                return
            self.oft_config_api = _has_param(next(iter(self.oft_classes.values())).__init__, "config")
        self.limitations[Capability.MIXED_BATCH] = {Method.OFT: (
            "PEFT's OFT layers take no adapter_names: forward(x, adapter_names=...) hands the keyword on to the "
            "bitsandbytes layer (TypeError); passed through unchanged"
        )}

    # -- DoRA -------------------------------------------------------------------------
    def _probe_dora(self) -> None:
        """DoRA is LoRA's bnb layer with ``LoraConfig(use_dora=True)`` (PEFT 0.9 added it; bnb layers took it in
        0.10); its magnitude lives in ``lora_magnitude_vector``."""
        if "lora" in self.unsupported:
            self.unsupported["dora"] = self.unsupported["lora"]
            return
        fields = {f.name for f in dataclasses.fields(self.peft.LoraConfig)}
        cls = next(iter(self.lora_classes.values()))
        if "use_dora" not in fields or not (self.lora_config_api or _has_param(cls.__init__, "use_dora")):
            self.unsupported["dora"] = f"peft {self.version}: LoRA bnb layers take no use_dora (DoRA)"
            return
        self.limitations.setdefault(Capability.MIXED_BATCH, {})[Method.DORA] = (
            "PEFT raises 'Cannot pass `adapter_names` when DoRA is enabled.' (peft/tuners/lora/layer.py "
            "_mixed_batch_forward checks)"
        )
        self.limitations.setdefault(Capability.LORA_BIAS, {})[Method.DORA] = (
            "PEFT's LoraConfig refuses lora_bias=True with use_dora=True"
        )

    # -- shared -----------------------------------------------------------------------
    def _probe_layer_features(self) -> None:
        tu = _import("peft.tuners.tuners_utils")
        base = getattr(tu, "BaseTunerLayer", None)
        if base is None or not hasattr(base, "enable_adapters"):
            self.unsupported["disable_adapters"] = f"peft {self.version}: BaseTunerLayer has no enable_adapters"
        if base is None or not hasattr(base, "delete_adapter"):
            self.unsupported["delete_adapter"] = f"peft {self.version}: BaseTunerLayer has no delete_adapter"
        if _import("transformers") is None or not hasattr(self.peft, "get_peft_model"):
            self.unsupported["model"] = "transformers does not import: no model-level entry (get_peft_model on a model)"
        if not self.lora_classes.get(4) and not self.oft_classes.get(4):
            self.unsupported["4bit"] = f"peft {self.version}: no adapter layer for bnb.nn.Linear4bit"
        if not self.lora_classes.get(8) and not self.oft_classes.get(8):
            self.unsupported["8bit"] = f"peft {self.version}: no adapter layer for bnb.nn.Linear8bitLt"
        self.clone_base_output_settable = False
        self.unsupported["clone_base_output=False"] = CLONE_MSG

    def methods(self) -> frozenset[Method]:
        other = {Method.OTHER} if _import("peft.mapping") is not None else set()
        return frozenset(m for m in ORACLE_METHODS if m not in self.unsupported) | self.tuners.methods() | other

    def capabilities(self) -> frozenset[Capability]:
        return frozenset(c for c in Capability if c not in self.unsupported)

    # -- translation of the protocol's keyword arguments ------------------------------
    @staticmethod
    def _params(method: str, params: dict[str, Any]) -> dict[str, Any]:
        lora = method in LORA_LIKE
        allowed = LORA_PARAMS if lora else OFT_PARAMS
        extra = set(params) - set(allowed) - ({"clone_base_output"} if lora else set()) - {LOFTQ_WEIGHT}
        if extra:
            raise TypeError(
                f"unknown {method} parameter(s) {sorted(extra)}; the protocol's {method} parameters are {sorted(allowed)}"
            )
        if lora and params.get("clone_base_output", True) is not True:
            raise ImplementationUnsupported(CLONE_MSG)
        return {k: params.get(k, v) for k, v in allowed.items() if k != LOFTQ_WEIGHT}

    def config(self, method: str, params: dict[str, Any]) -> Any:
        """PEFT's own ``LoraConfig``/``OFTConfig`` for the protocol's parameters (PEFT validates them); DoRA is
        ``LoraConfig(use_dora=True)``."""
        p = self._params(method, params)
        if method in LORA_LIKE:
            if "lora_bias" in self.unsupported:
                if p.pop("lora_bias"):
                    raise ImplementationUnsupported(self.unsupported["lora_bias"])
            return self.peft.LoraConfig(**p, **({"use_dora": True} if method == "dora" else {}))
        return self.peft.OFTConfig(**p)

    def build(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        method = spec.method
        if method in {str(m) for m in TWIN_METHODS}:
            return self.tuners.build(base_layer, spec)
        if method not in {m.value for m in Method} and method in self.others.found():
            return self.others.build(base_layer, spec)
        if method not in ("lora", "oft", "dora"):
            raise ValueError(f"unknown method {method!r}; PEFT is tested with {sorted(map(str, self.methods()))}")
        if method in self.unsupported:
            raise ImplementationUnsupported(self.unsupported[method])
        if is_dense(base_layer):  # the dense twin: PEFT's own dispatch over a plain nn.Linear
            p = self._params(method, dict(spec.params))
            return PeftAdapterLayer(inject(self.peft, self.config(method, p), base_layer, spec.adapter_name), method,
                                    self)
        bits = bits_of(base_layer)
        lora = method in LORA_LIKE
        classes = self.lora_classes if lora else self.oft_classes
        cls = classes.get(bits)
        if cls is None:
            raise ImplementationUnsupported(f"peft {self.version} has no {method} layer for {bits}-bit bnb layers")
        p = self._params(method, dict(spec.params))
        name = spec.adapter_name
        init = of_value(p["init_lora_weights"]) if lora else None
        if init is not None:  # an initialization that reads the base (LoftQ's replaces a default one afterwards)
            config = self.config(method, {**p, "init_lora_weights": True} if init is Init.LOFTQ else p)
            return PeftAdapterLayer(self.inits.build(base_layer, config, init, name, spec.params.get(LOFTQ_WEIGHT)),
                                    method, self)
        if lora:
            if self.lora_config_api:
                layer = cls(base_layer, name, config=self.config(method, p), r=p["r"], lora_alpha=p["lora_alpha"])
            else:
                layer = cls(base_layer, name, **self._kwargs(cls.__init__, self._dora_kwargs(method, p)))
        else:
            if self.oft_config_api:
                layer = cls(base_layer, name, config=self.config("oft", p), r=p["r"])
            else:
                layer = cls(base_layer, name, **self._kwargs(cls.__init__, p))
            if self.oft_style == "backend" and getattr(layer, "quantization_backend", None) is None:
                raise ImplementationUnsupported(
                    f"peft {self.version}: oft.layer.Linear found no quantization backend for "
                    f"{type(base_layer).__name__} (peft.utils.quantization_utils.resolve_quantization_backend)"
                )
        return PeftAdapterLayer(layer, method, self)

    @staticmethod
    def _dora_kwargs(method: str, p: dict[str, Any]) -> dict[str, Any]:
        return {**p, "use_dora": True} if method == "dora" else p

    def _kwargs(self, fn: Any, p: dict[str, Any]) -> dict[str, Any]:
        """Keyword hyper-parameters for pre-config PEFT (<= 0.18): only those ``fn`` accepts."""
        sig = inspect.signature(fn).parameters
        missing = [k for k, v in p.items() if k not in sig and v != (LORA_PARAMS | OFT_PARAMS | {"use_dora": False}).get(k)]
        if missing:
            raise ImplementationUnsupported(f"peft {self.version}: {fn.__qualname__} takes no {missing}")
        return {k: v for k, v in p.items() if k in sig}

    def add_adapter(self, layer: nn.Module, method: str, name: str, params: dict[str, Any]) -> None:
        """What PEFT's tuner model does for an existing adapter layer: ``update_layer``."""
        p = self._params(method, params)
        update = layer.update_layer
        if _has_param(update, "config"):
            if method in LORA_LIKE:
                update(name, p["r"], lora_alpha=p["lora_alpha"], config=self.config(method, p))
            else:
                update(name, p["r"], config=self.config("oft", p))
        else:
            kwargs = self._kwargs(update, self._dora_kwargs(method, p))
            kwargs.pop("r", None)
            update(name, p["r"], **kwargs)


class PeftAdapterLayer(PeftLayer):
    """Protocol wrapper around one PEFT LoRA/OFT/DoRA layer (``self.layer``); every call goes to PEFT."""

    def __init__(self, layer: nn.Module, method: str, api: PeftApi) -> None:
        super().__init__()
        self.layer = layer
        self.method = method
        self._api = api

    def __deepcopy__(self, memo: dict) -> PeftAdapterLayer:
        """Copy the PEFT layer; share the API object (it holds imported modules, which do not copy)."""
        import copy

        return PeftAdapterLayer(copy.deepcopy(self.layer, memo), self.method, self._api)

    def add_adapter(self, adapter_name: str, **params: Any) -> None:
        self._api.add_adapter(self.layer, self.method, adapter_name, params)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.layer.active_adapter

    @property
    def adapter_names(self) -> list[str]:
        return list((self.layer.oft_R if self.method == "oft" else self.layer.lora_A).keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """PEFT's own Parameters (not copies), under the canonical names."""
        if self.method in LORA_LIKE:
            a, b = self.layer.lora_A[name], self.layer.lora_B[name]
            out = {"lora_A.weight": a.weight, "lora_B.weight": b.weight}
            if b.bias is not None:
                out["lora_B.bias"] = b.bias
            if self.method == "dora":
                out["lora_magnitude_vector.weight"] = self.layer.lora_magnitude_vector[name].weight
            return out
        return {"oft_R.weight": self.layer.oft_R[name].weight}

    @property
    def disable_adapters(self) -> bool:
        return bool(self.layer.disable_adapters)

    def extra_repr(self) -> str:
        return f"peft {self._api.version}, method={self.method}"


class PeftImplementation(LibraryImplementation):
    """The installed PEFT's LoRA/OFT layers for bitsandbytes (version-aware, see the module docstring)."""

    name = "peft"
    api_class = PeftApi

    def other_methods(self) -> dict[str, frozenset[str]]:
        """Every other tuner of the installed PEFT that targets nn.Linear -> the optional operations (merge, unmerge,
        safe_merge) its bitsandbytes classes have (family ``other``: TWIN-CREATE)."""
        return self._api.others.operations()

    def other_methods_excluded(self) -> dict[str, str]:
        """The installed PEFT's tuners left out of ``other_methods``, with why."""
        self._api.others.found()
        return dict(self._api.others.excluded)

    @property
    def model(self) -> PeftModelEntry:
        """The model-level entry (capability ``model``): get_peft_model, merge_and_unload, save/load_pretrained."""
        return PeftModelEntry(self._api)

    def init_unavailable(self, init: str, device: str) -> str | None:
        return self._api.inits.unavailable(init, device)

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        from conformance.impls.reference import cast_adapter

        layer = self._api.build(base_layer, spec)
        cast_adapter(layer, spec)
        return layer
