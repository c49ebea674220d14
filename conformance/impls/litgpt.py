"""LitGPT's own LoRA layer as an implementation under test (``--impl litgpt``).

What is tested is ``litgpt.lora.LoRALinear`` (``litgpt/lora.py``): ``forward``, ``merge``,
``get_lora_AB`` and its ``lora_A``/``lora_B`` Parameters, with the bitsandbytes layer the check hands
over put in as its ``linear``. That placement is the only glue: in LitGPT's QLoRA path
(``litgpt finetune_lora --quantize bnb.nf4``) Lightning Fabric's ``BitsandbytesPrecision`` patches
``torch.nn.Linear`` with its subclass of that bnb layer while the model is built
(``module_init_context``), so the bnb layer lands exactly in ``LoRALinear.linear``. The layer is built
the way that context builds it: on the base layer's device, with the default dtype set to the
adapter dtype (Fabric's ``_DtypeContextManager``), so ``lora_A``/``lora_B`` have that dtype.

``LitgptAdapterLayer`` translates names only:

- the one adapter LitGPT holds has no name; the protocol's name for it is the ``adapter_name`` it
  was created with, and any other name is refused with ``ImplementationUnsupported``;
- ``adapter_parameters(name)`` returns LitGPT's own Parameters (not copies): ``lora_A.weight`` is
  ``LoRALinear.lora_A`` (r x in) and ``lora_B.weight`` is ``LoRALinear.lora_B`` (out x r), the same
  layout as PEFT's (no transposition); the scaling is LitGPT's ``lora_alpha / r`` (PEFT's, no rsLoRA);
- ``get_delta_weight(name)`` is ``LoRALinear.get_lora_AB()`` (``(B @ A) * scaling``);
- ``merged_adapters`` is ``[name]`` while ``LoRALinear.merged`` is True, else ``[]``.

One convention on state, not behaviour: ``init_lora_weights=False`` (the protocol's "random B") is
expressed by giving ``lora_B`` the values a trained checkpoint would give it, drawn like LitGPT
draws ``lora_A`` (``kaiming_uniform_(a=sqrt(5))``, what ``nn.Linear`` and the reference use); LitGPT
itself always starts with ``B = 0``.

What LitGPT 0.5.13 does not have is not declared and not filled in (capabilities are found by
feature detection on ``LoRALinear``): no OFT, one adapter per layer (no add/set/delete, no mixed
batches), no unmerge, no safe merge (``merge()`` takes no arguments), no rsLoRA, no LoRA bias, no
switch to disable the adapter, and no cast of the input to the adapter dtype (``forward`` multiplies
``x`` with ``lora_A`` as it comes). Asking for any of these raises ``ImplementationUnsupported``
with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported
from conformance.core.vocabulary import ORACLE_METHODS, Capability, Method
from conformance.impls.library import LibraryImplementation, LibraryLayer, check_lora_params
from conformance.quant.layers import bits_of
from conformance.quant.torchnames import dtype_of

INSTALL = ("pip install --no-deps litgpt==0.5.13 lightning lightning-utilities torchmetrics tqdm pyyaml "
           "safetensors psutil==7.2.2 (in a venv of its own: LitGPT caps huggingface-hub below what transformers needs)")

#: the protocol's LoRA parameters and the value LitGPT's LoRALinear behaves as (None: LitGPT takes it)
LORA_PARAMS: dict[str, Any] = {
    "r": None, "lora_alpha": None, "lora_dropout": None, "init_lora_weights": True, "use_rslora": False,
    "lora_bias": False, "clone_base_output": True,
}


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _params_of(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


class LitgptApi:
    """What the installed LitGPT's ``LoRALinear`` offers, found by feature detection."""

    def __init__(self) -> None:
        lora = _import("litgpt.lora")
        if lora is None or not hasattr(lora, "LoRALinear"):
            raise ImplementationUnsupported(f"litgpt.lora does not import: {INSTALL}")
        self.lora_cls: type = lora.LoRALinear
        try:
            self.version: str = metadata.version("litgpt")
        except metadata.PackageNotFoundError:
            self.version = "unknown"
        self.unsupported: dict[str, str] = {}
        self._probe()

    def _gap(self, capability: str, what: str) -> None:
        self.unsupported[capability] = f"litgpt {self.version}: {what}"

    def _probe(self) -> None:
        cls = self.lora_cls
        init = _params_of(cls.__init__)
        merge = _params_of(cls.merge)
        self._gap("oft", "has no OFT (litgpt/lora.py is LoRA only)")
        self._gap("dora", "has no DoRA (litgpt/lora.py LoRALinear has no magnitude vector)")
        self._gap("multi_adapter", "LoRALinear holds one unnamed adapter (lora_A/lora_B), no add_adapter/set_adapter")
        self._gap("additive_adapters", "one adapter per layer: nothing to activate together")
        self._gap("multi_merge", "one adapter per layer: nothing to merge together")
        self._gap("active_trainable", "one adapter per layer: no set_adapter to make it trainable or not")
        self._gap("mixed_batch", "LoRALinear.forward(x) takes no adapter_names")
        self._gap("delete_adapter", "LoRALinear has no delete_adapter")
        self._gap("model", "LitGPT's models are its own GPT (litgpt.lora.GPT), not transformers models: no model-level "
                           "entry over a transformers model")
        self._gap("prepare", "no model-level entry (above): nothing to prepare for training")
        self._gap("distributed", "not declared: LitGPT trains through lightning Fabric strategies; LoRALinear layers "
                  "under plain DistributedDataParallel have not been checked")
        if not hasattr(cls, "unmerge"):
            self._gap("unmerge", "LoRALinear has merge() but no unmerge()")
        if "safe_merge" not in merge:
            self._gap("safe_merge", "LoRALinear.merge() takes no safe_merge (no check of the merged weights)")
        if "use_rslora" not in init:
            self._gap("rslora", "LoRALinear scales by lora_alpha / r only (no use_rslora)")
        if "lora_bias" not in init:
            self._gap("lora_bias", "LoRALinear's B has no bias (no lora_bias)")
        if not hasattr(cls, "enable_adapters"):
            self._gap("disable_adapters", "LoRALinear has no switch to disable its adapter (only r=0 at construction)")
        if "lora_dropout" not in init:
            self._gap("dropout", "LoRALinear takes no lora_dropout")
        # forward computes `self.lora_dropout(x) @ self.lora_A.transpose(0, 1)` (litgpt/lora.py, 0.5.13): x as it comes
        self._gap("input_cast", "LoRALinear.forward multiplies x with lora_A without casting x to the adapter dtype")
        fabric_bnb = _import("lightning.fabric.plugins.precision.bitsandbytes")
        modes = getattr(getattr(fabric_bnb, "BitsandbytesPrecision", None), "__init__", None)
        if fabric_bnb is None or modes is None:
            self._gap("4bit", "lightning.fabric's BitsandbytesPrecision (LitGPT's --quantize bnb.*) does not import")
            self._gap("8bit", "lightning.fabric's BitsandbytesPrecision (LitGPT's --quantize bnb.*) does not import")
        self._gap("dense_twin", "this wrapper builds LoRALinear over bitsandbytes layers only (the TWIN-* clauses "
                                "are PEFT's and the reference's for now)")
        for cap in ("init_pissa", "init_pissa_niter", "init_olora", "init_corda", "init_lora_ga", "init_loftq"):
            # LoRALinear.reset_parameters: kaiming A, zero B; litgpt/lora.py has no init option that reads the base
            self._gap(cap, "LoRALinear initializes A (kaiming) and B (zeros) only; no initialization reads the base")
        self.clone_base_output_settable = False
        self.unsupported["clone_base_output=False"] = (
            f"litgpt {self.version}: LoRALinear.forward returns `pretrained + lora` (never writes the base output "
            "in place) and has no switch for an in-place add"
        )

    def methods(self) -> frozenset[Method]:
        return frozenset(m for m in ORACLE_METHODS if m not in self.unsupported)

    def capabilities(self) -> frozenset[Capability]:
        return frozenset(c for c in Capability if c not in self.unsupported)

    def kwargs(self, params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """LoRALinear keyword arguments for the protocol's parameters, and whether B starts random."""
        check_lora_params(params, LORA_PARAMS, self.unsupported)
        if params.get("lora_dropout", 0.0) and "dropout" in self.unsupported:
            raise ImplementationUnsupported(self.unsupported["dropout"])
        kw = {"r": params.get("r", 8), "lora_alpha": params.get("lora_alpha", 8)}
        if "lora_dropout" in params:
            kw["lora_dropout"] = params["lora_dropout"]
        return kw, params.get("init_lora_weights", True) is False

    def build(self, base_layer: nn.Module, spec: AdapterSpec, dtype: torch.dtype | None = None) -> LitgptAdapterLayer:
        """LitGPT's layer over ``base_layer``; ``dtype`` overrides the adapter dtype of ``spec``."""
        if spec.method != "lora":
            raise ImplementationUnsupported(self.unsupported.get(spec.method, f"unknown method {spec.method!r}"))
        bits = bits_of(base_layer)  # a bnb Linear4bit/Linear8bitLt, or a one-line error
        if f"{bits}bit" in self.unsupported:
            raise ImplementationUnsupported(self.unsupported[f"{bits}bit"])
        kw, random_b = self.kwargs(dict(spec.params))
        device = base_layer.weight.device
        with _init_context(device, dtype or _dtype_of(spec)):
            layer = self.lora_cls(base_layer.in_features, base_layer.out_features, **kw)
        layer.linear = base_layer  # the only glue: where Fabric's bnb precision puts its bnb layer
        if random_b and isinstance(getattr(layer, "lora_B", None), nn.Parameter):
            with torch.no_grad():
                nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
        return LitgptAdapterLayer(layer, spec.adapter_name, self.version, dict(self.unsupported))


def _dtype_of(spec: AdapterSpec) -> torch.dtype:
    """The adapter dtype the spec asks for (``AdapterSpec.dtype`` where the protocol has it), float32 otherwise."""
    try:
        dtype: torch.dtype | None = dtype_of(getattr(spec, "dtype", None) or torch.float32)
    except ValueError:
        dtype = None
    if dtype is None or not dtype.is_floating_point:
        raise ValueError(f"adapter dtype must be a floating torch dtype, got {getattr(spec, 'dtype', None)!r}")
    return dtype


@contextlib.contextmanager
def _init_context(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """What Fabric's ``init_module`` does while LitGPT builds the model: device and default dtype set."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


class LitgptAdapterLayer(LibraryLayer):
    """Protocol names for one ``litgpt.lora.LoRALinear`` (``self.layer``); every call goes to LitGPT."""

    def __init__(self, layer: nn.Module, adapter_name: str, version: str, unsupported: dict[str, str]) -> None:
        super().__init__()
        self.layer = layer
        self.adapter_name = adapter_name
        self._version = version
        self._unsupported = unsupported

    def _refuse(self, capability: str) -> None:
        raise ImplementationUnsupported(self._unsupported[capability])

    def _own(self, names: Sequence[str]) -> None:
        other = [n for n in names if n != self.adapter_name]
        if other:
            raise ImplementationUnsupported(
                f"litgpt {self._version}: LoRALinear holds one adapter (here {self.adapter_name!r}), not {other}"
            )

    # -- forward / merge --------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        if safe_merge and "safe_merge" in self._unsupported:
            self._refuse("safe_merge")
        if adapter_names is not None:
            self._own(list(adapter_names))
        if safe_merge:
            self.layer.merge(safe_merge=True)
        else:
            self.layer.merge()

    def unmerge(self) -> None:
        if "unmerge" in self._unsupported:
            self._refuse("unmerge")
        self.layer.unmerge()

    @property
    def merged_adapters(self) -> list[str]:
        return [self.adapter_name] if self.layer.merged else []

    def get_delta_weight(self, name: str) -> torch.Tensor:
        self._own([name])
        return self.layer.get_lora_AB()

    # -- adapters ---------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, **params: Any) -> None:
        self._refuse("multi_adapter")

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Only the one adapter, which is always active in LitGPT: naming it changes nothing."""
        self._own([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    @property
    def active_adapters(self) -> list[str]:
        return [self.adapter_name]

    @property
    def active_adapter(self) -> str:
        return self.adapter_name

    @property
    def adapter_names(self) -> list[str]:
        return [self.adapter_name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """LitGPT's own Parameters (not copies): lora_A (r x in), lora_B (out x r)."""
        self._own([name])
        return {"lora_A.weight": self.layer.lora_A, "lora_B.weight": self.layer.lora_B}

    # -- base layer -------------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        """LitGPT's ``linear`` (its merge replaces the weight Parameter; read it fresh each time)."""
        return self.layer.linear

    @property
    def in_features(self) -> int:
        return self.layer.linear.in_features

    @property
    def out_features(self) -> int:
        return self.layer.linear.out_features

    def extra_repr(self) -> str:
        return f"litgpt {self._version}, adapter {self.adapter_name!r}"


class LitgptImplementation(LibraryImplementation):
    """The installed LitGPT's ``LoRALinear`` over bitsandbytes layers (see the module docstring)."""

    name = "litgpt"
    api_class = LitgptApi
