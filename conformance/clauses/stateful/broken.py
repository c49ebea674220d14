"""Broken twins of the stateful clauses: the reference with one bug mixed into the layer class it builds
(``suites/test_stateful.py`` shows the machine catches each one; its reproducer tests rebuild ``CONFIGURED`` from
``conformance.clauses.stateful.broken:CONFIGURED``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec
from conformance.impls.reference import ReferenceImplementation


class _UnmergeForgetsRequantize:
    """unmerge() clears the bookkeeping but never writes the weights back."""

    def unmerge(self) -> None:
        self.merged_adapters.clear()


class _MergeForgetsFlags:
    """merge() rewrites the weights but leaves merged_adapters empty."""

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.merged_adapters.clear()


class _DeepcopyLosesAdapter:
    """copy.deepcopy drops the most recently added adapter (when there are several)."""

    def __deepcopy__(self, memo: dict) -> nn.Module:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        if len(new.adapter_names) > 1:
            last = new.adapter_names[-1]
            new._drop_adapter(last)
            new.active_adapters = [n for n in new.active_adapters if n != last] or new.adapter_names[:1]
        return new


class _MergeRaises:
    """merge() always raises (a library whose merges are broken): the examples end at the first merge."""

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        raise RuntimeError("merge is broken")


class _OutputOffForPositiveInput:
    """forward adds 1 to the output when the input's first element is positive: a finding that needs
    the drawn input seed."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = super().forward(x, *args, **kwargs)
        return y + 1 if float(x.flatten()[0]) > 0 else y


class _RecordsMerges:
    """merge() records its safe_merge argument (to see what the machine drew)."""

    calls: list[bool] = []

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        type(self).calls.append(bool(safe_merge))
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


class _EvalDeactivates:
    """eval() leaves no adapter active (a layer that resets its state on a mode switch)."""

    def train(self, mode: bool = True) -> nn.Module:
        out = super().train(mode)
        if not mode:
            self.active_adapters = []
        return out


class _CompilerDisabledForward:
    """forward is wrapped in ``torch.compiler.disable`` (as a library might do to keep bitsandbytes' graph breaks out
    of users' graphs): eager forwards are right, but every call through ``torch.compile`` runs eagerly
    (STATE-COMPILE)."""

    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(*args, **kwargs)  # type: ignore[misc]


class _ThreeBugs(_DeepcopyLosesAdapter, _EvalDeactivates, _MergeForgetsFlags):
    """Three distinct violations: STATE-ADAPTERS-PRESERVED by a deepcopy and by eval(), STATE-MERGED-FLAGS by a merge."""


class _SilentUnknownAdapter:
    """set_adapter() accepts unknown names silently (what a layer without validation does)."""

    def set_adapter(self, adapter_names: Any) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = names


class _DoraIgnoresMagnitude:
    """DoRA's factor ``m / ||W0 + s B A||_c`` taken as 1 in the forward and the merge (a DoRA layer that computes
    LoRA): the model must tell DoRA from LoRA (the machine moves each magnitude off its init, so ``m/n != 1``)."""

    def _factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(norm)


class _DoraUnmergeRecomputesNorm:
    """DoRA's unmerge divides by the factor of the norm of the *merged* weight instead of the norm its merge took
    (what PEFT's cached ``<adapter>-weight_norm`` avoids: peft/tuners/lora/variants.py ``DoraLinearVariant.unmerge``)."""

    def _undo(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        factor = self._factor(name, torch.linalg.vector_norm(weight, dim=1)).detach().float()
        return weight / factor[:, None] - self.get_delta_weight(name).detach().float()


class _DoraCreateRaises:
    """Building a DoRA layer raises (a library without DoRA on quantized bases that declares it): every DoRA example
    ends at its first step, and the clauses must not pass on the other methods' steps (per-case floors)."""


_CLASSES: dict[tuple[type, type], type] = {}


class _Broken(ReferenceImplementation):
    mixin: type = object

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.name = f"broken-{type(self).__name__}{tag}"

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        if self.mixin is _DoraCreateRaises and spec.method == "dora":
            raise RuntimeError("no DoRA here")
        layer = super().create(base_layer, spec)
        key = (self.mixin, type(layer))
        if key not in _CLASSES:
            _CLASSES[key] = type(f"{self.mixin.__name__.strip('_')}{type(layer).__name__}", key, {})
        layer.__class__ = _CLASSES[key]
        return layer


def _twin(name: str, mixin: type) -> type[_Broken]:
    """The reference with ``mixin``'s defect, as a class of this module named ``name`` (``module:name`` rebuilds it)."""
    return type(name, (_Broken,), {"mixin": mixin, "__module__": __name__, "__qualname__": name})


UnmergeForgetsRequantize = _twin("UnmergeForgetsRequantize", _UnmergeForgetsRequantize)
MergeForgetsFlags = _twin("MergeForgetsFlags", _MergeForgetsFlags)
DeepcopyLosesAdapter = _twin("DeepcopyLosesAdapter", _DeepcopyLosesAdapter)
SilentUnknownAdapter = _twin("SilentUnknownAdapter", _SilentUnknownAdapter)
ThreeBugs = _twin("ThreeBugs", _ThreeBugs)
MergeRaises = _twin("MergeRaises", _MergeRaises)
OutputOffForPositiveInput = _twin("OutputOffForPositiveInput", _OutputOffForPositiveInput)
CompilerDisabledForward = _twin("CompilerDisabledForward", _CompilerDisabledForward)
DoraIgnoresMagnitude = _twin("DoraIgnoresMagnitude", _DoraIgnoresMagnitude)
DoraUnmergeRecomputesNorm = _twin("DoraUnmergeRecomputesNorm", _DoraUnmergeRecomputesNorm)
DoraCreateRaises = _twin("DoraCreateRaises", _DoraCreateRaises)


class Minimal(_Broken):
    """The reference declaring none of the optional capabilities (no unmerge, safe merge, rsLoRA, LoRA bias, ...)."""

    mixin = _RecordsMerges
    capabilities = frozenset({"lora", "dora", "oft", "4bit", "8bit"})


#: a configured object: a reproducer must rebuild it from "conformance.clauses.stateful.broken:CONFIGURED", tag
#: included
CONFIGURED = MergeForgetsFlags(tag="-configured")
