"""The installed PEFT's other tuners on bitsandbytes layers (and every method over a plain ``nn.Linear``, the dense
twin): built the way users get them, through ``peft.get_peft_model`` on a one-layer model.

PEFT 0.21.2 puts methods onto ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` through a ``bnb.py`` per method
(AdaLoRA, HiRA, IA3, PVeRA, RandLoRA, RoAd) or its generic quantization backend (BOFT, MiSS, SHiRA, VeRA:
``src/peft/utils/quantization_utils.py``). ``get_peft_model`` (not ``inject_adapter_in_model``, which PEFT documents
as not supporting tuners whose state is shared between target layers, VeRA's projections among them) dispatches to
whichever class the installed release has; whatever PEFT raises there propagates unchanged (the TWIN-* clauses judge
refusals). The wrapper translates the protocol and nothing else.

What a release has is found by feature detection: a method whose config class (``conformance.core.methods`` row)
the installed ``peft`` lacks is unsupported with the reason; a method whose bitsandbytes layer class defines no
``merge`` / ``unmerge`` of its own (only ``BaseTunerLayer``'s, which raises) is limited for ``merge`` / ``unmerge``
/ ``safe_merge`` with PEFT's class named.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported
from conformance.core.methods import row
from conformance.core.vocabulary import TWIN_METHODS, Capability, Method
from conformance.impls.library import LibraryLayer

#: the attribute of the one-layer model that holds the base (``target_modules``)
TARGET = "lin"


class OneLayer(nn.Module):
    """A model of one linear layer, as ``get_peft_model`` takes any ``nn.Module``, marked the way transformers marks a
    model it loaded with a ``BitsAndBytesConfig`` (``quantizers/quantizer_bnb_4bit.py``: ``is_loaded_in_4bit``; 8-bit:
    ``is_loaded_in_8bit``): PEFT's dispatchers pick their bitsandbytes classes only for a model so marked."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        setattr(self, TARGET, base)
        if isinstance(base, bnb.nn.Linear4bit):
            self.is_loaded_in_4bit = True
        elif isinstance(base, bnb.nn.Linear8bitLt):
            self.is_loaded_in_8bit = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, TARGET)(x)


def inject(peft: Any, config: Any, base: nn.Module, adapter_name: str) -> nn.Module:
    """PEFT's tuner layer over ``base``, built by ``peft.get_peft_model`` on a one-layer model."""
    config.target_modules = [TARGET]
    holder = OneLayer(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(holder, config, adapter_name=adapter_name)
    return getattr(holder, TARGET)


#: what a tuner outside the method table needs besides its defaults to build on the suite's layers (64 x 48, 48 x 64,
#: 64 x 64), found by the dense probe of PEFT 0.21.2 (``OtherTuners``): each default named fails on a dense layer
OTHER_CONFIG: dict[str, dict[str, Any]] = {
    "c3a": {"block_size": 16},  # default block_size 256 must divide in_features
    "vblora": {"vector_length": 16},  # default vector_length 256 must divide in_features
}
#: the dense probe layers: every shape the twin clauses build
PROBE_SHAPES = ((64, 48), (48, 64), (64, 64))


def _own(cls: type, name: str, stop: type) -> bool:
    """Whether ``cls`` defines ``name`` in a class before ``stop`` in its MRO."""
    for klass in cls.__mro__:
        if klass is stop:
            return False
        if name in klass.__dict__:
            return True
    return False


class OtherTuners:
    """Every tuner of the installed PEFT outside the method table that targets ``nn.Linear``: found once, on first
    use, by a dense probe: ``get_peft_model`` over a plain ``nn.Linear`` of each shape the clauses build, then a
    forward, and ``merge``/``unmerge``/``merge(safe_merge=True)`` to learn which of them the tuner has (what it does on
    the path libraries test well; a tuner whose dense forward needs more than the input, Poly's ``task_ids``, is
    left out with the reason)."""

    def __init__(self, peft: Any, version: str, known: frozenset[str]) -> None:
        self.peft, self.version, self.known = peft, version, known
        self._found: dict[str, tuple[Any, frozenset[str]]] | None = None
        self.excluded: dict[str, str] = {}

    def found(self) -> dict[str, tuple[Any, frozenset[str]]]:
        """Tuner name (PEFT's ``PeftType`` value, lower case) -> (its config class, the operations it has densely)."""
        if self._found is None:
            self._found = self._probe()
        return self._found

    def _probe(self) -> dict[str, tuple[Any, frozenset[str]]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._probe_all()

    def _probe_all(self) -> dict[str, tuple[Any, frozenset[str]]]:
        import dataclasses

        mapping = getattr(importlib.import_module("peft.mapping"), "PEFT_TYPE_TO_CONFIG_MAPPING", {})
        found: dict[str, tuple[Any, frozenset[str]]] = {}
        for peft_type, cfg in sorted(mapping.items(), key=lambda kv: str(kv[0])):
            name = str(getattr(peft_type, "value", peft_type)).lower()
            if name in self.known:
                continue
            if "target_modules" not in {f.name for f in dataclasses.fields(cfg)}:
                self.excluded[name] = f"{cfg.__name__} has no target_modules (it does not put layers on nn.Linear)"
                continue
            try:
                ops = frozenset.intersection(*(self._dense_ops(name, cfg, shape) for shape in PROBE_SHAPES))
            except Exception as exc:  # noqa: BLE001 - a tuner that does not run on nn.Linear is out of scope
                self.excluded[name] = (f"does not build and run forward on a dense nn.Linear with its defaults: "
                                       f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            found[name] = (cfg, ops)
        return found

    def _dense_ops(self, name: str, cfg: Any, shape: tuple[int, int]) -> frozenset[str]:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # some tuners draw progress bars
            layer = inject(self.peft, cfg(**OTHER_CONFIG.get(name, {})), nn.Linear(*shape), "default")
        with torch.no_grad():
            layer(torch.randn(2, shape[0]))
        ops: set[str] = set()
        for op, call in (("merge", lambda: layer.merge()), ("unmerge", lambda: layer.unmerge()),
                         ("safe_merge", lambda: layer.merge(safe_merge=True))):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    call()
            except Exception:  # noqa: BLE001 - an operation the tuner does not have densely
                break
            ops.add(op)
        return frozenset(ops)

    def operations(self) -> dict[str, frozenset[str]]:
        return {name: ops for name, (_cfg, ops) in self.found().items()}

    def build(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        cfg = self.found()[spec.method][0]
        params = {**OTHER_CONFIG.get(spec.method, {}), **dict(spec.params)}
        return PeftTunerLayer(inject(self.peft, cfg(**params), base_layer, spec.adapter_name), spec.method)


class TunerApi:
    """The twin methods the installed PEFT has (``configs``), why the others are missing, and their limitations."""

    def __init__(self, peft: Any, version: str) -> None:
        self.peft = peft
        self.version = version
        self.configs: dict[Method, type] = {}
        self.unsupported: dict[str, str] = {}
        self.limitations: dict[Capability, dict[Method, str]] = {}
        base_cls = getattr(importlib.import_module("peft.tuners.tuners_utils"), "BaseTunerLayer", object)
        for method in sorted(TWIN_METHODS, key=str):
            r = row(method)
            cfg = getattr(peft, r.peft_config, None)
            if cfg is None:
                self.unsupported[str(method)] = f"peft {version} has no {r.peft_config}"
                continue
            self.configs[method] = cfg
            classes = self._bnb_classes(method, base_cls)
            for cap, op in ((Capability.MERGE, "merge"), (Capability.UNMERGE, "unmerge")):
                lacking = [f"{c.__module__}.{n}" for n, c in classes if not _own(c, op, base_cls)]
                if lacking:
                    self.limitations.setdefault(cap, {})[method] = (
                        f"peft {version}: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no {op}() "
                        "of its own (BaseTunerLayer's raises)")
            no_safe = [f"{c.__module__}.{n}" for n, c in classes
                       if _own(c, "merge", base_cls) and "safe_merge" not in inspect.signature(c.merge).parameters]
            if no_safe:
                self.limitations.setdefault(Capability.SAFE_MERGE, {})[method] = (
                    f"peft {version}: {', '.join(no_safe)}.merge takes no safe_merge")
        if Capability.MERGE in self.limitations:
            for method in self.limitations[Capability.MERGE]:
                for cap in (Capability.UNMERGE, Capability.SAFE_MERGE):
                    self.limitations.setdefault(cap, {}).setdefault(method, self.limitations[Capability.MERGE][method])

    @staticmethod
    def _bnb_classes(method: Method, base_cls: type) -> list[tuple[str, type]]:
        """The classes PEFT puts on bitsandbytes layers for ``method``: the tuner layers its ``bnb.py`` defines
        (AdaLoRA names them ``SVDLinear4bit``/``SVDLinear8bitLt``), else its ``layer.Linear`` (the generic
        quantization backend)."""
        for mod_name, only in ((f"peft.tuners.{method}.bnb", None), (f"peft.tuners.{method}.layer", "Linear")):
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
            found = [(n, c) for n, c in sorted(vars(mod).items())
                     if isinstance(c, type) and c.__module__ == mod.__name__ and issubclass(c, base_cls)
                     and (only is None or n == only)]
            if found:
                return found
        return []

    def methods(self) -> frozenset[Method]:
        return frozenset(self.configs)

    def build(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        method = Method(spec.method)
        if method not in self.configs:
            raise ImplementationUnsupported(self.unsupported.get(str(method), f"peft {self.version}: no {method}"))
        config = self.configs[method](**dict(spec.params))
        return PeftTunerLayer(inject(self.peft, config, base_layer, spec.adapter_name), str(method))


class PeftLayer(LibraryLayer):
    """What every wrapper of one PEFT tuner layer (``self.layer``) passes straight to PEFT: every PEFT tuner layer
    (``BaseTunerLayer``) has these under these names."""

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        self.layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        self.layer.unmerge()

    @property
    def merged_adapters(self) -> list[str]:
        return self.layer.merged_adapters

    def get_delta_weight(self, name: str) -> torch.Tensor:
        return self.layer.get_delta_weight(name)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        self.layer.set_adapter(adapter_names if isinstance(adapter_names, str) else list(adapter_names))

    @property
    def active_adapters(self) -> list[str]:
        return list(self.layer.active_adapters)

    def enable_adapters(self, enabled: bool) -> None:
        self.layer.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self.layer.delete_adapter(adapter_name)

    @property
    def base_layer(self) -> nn.Module:
        """PEFT's current base layer (merges may replace its ``weight``; read it fresh each time)."""
        return self.layer.get_base_layer()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class PeftTunerLayer(PeftLayer):
    """Protocol wrapper around one PEFT tuner layer of a method without a hand oracle; every call goes to PEFT."""

    def __init__(self, layer: nn.Module, method: str) -> None:
        super().__init__()
        self.layer = layer
        self.method = method

    def adapter_parameters(self, name: str) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of adapter ``name`` (PEFT's own tensors), named by PEFT's attribute path with
        the adapter key taken out (``vera_lambda_b``, ``vera_A``, ``lora_A.weight``); shared projections included."""
        out: dict[str, torch.Tensor] = {}
        for items in (self.layer.named_parameters(), self.layer.named_buffers()):
            for path, t in items:
                parts = path.split(".")
                if parts[0] == "base_layer" or name not in parts:
                    continue
                out[".".join(p for p in parts if p != name)] = t
        return out

    def extra_repr(self) -> str:
        return f"peft tuner {self.method}"
