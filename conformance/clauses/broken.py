"""Broken twins: deliberately broken implementations that show a clause can fail.

Each area keeps its twins in ``conformance.clauses.<area>.broken``: ``BROKEN`` (one per clause of the area: the clause
passes on the reference and fails on its twin) and, where an area has them, ``MORE`` (further ``(clause, twin)``
pairs), filled by the ``@twin(clause, name)`` decorator on each patch. A twin is the reference implementation with one bug someone could plausibly write: ``Broken(name, patch)``
patches the layer ``create`` returns, ``spec_hook`` changes the spec it is asked for. The twins are test material:
nothing in the package imports them; the suites do (``suites/test_merge_checks.py``,
``suites/test_coverage_checks.py``).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec
from conformance.impls.reference import ReferenceImplementation

Patch = Callable[[nn.Module, AdapterSpec], None]


class Broken(ReferenceImplementation):
    """The reference with one deliberate bug: ``patch(layer, spec)`` and/or ``spec_hook(spec)``."""

    def __init__(self, name: str, patch: Patch | None = None,
                 spec_hook: Callable[[AdapterSpec], AdapterSpec] | None = None, shows_on: str | None = None) -> None:
        super().__init__()
        self.name = f"broken-{name}"
        self.patch = patch
        self.spec_hook = spec_hook
        #: one case family (``"lora/4bit"``) the bug shows on: the suite's test that the twin fails runs its clause
        #: on that family alone (``conformance.testing.broken_twin_tests``), the reference runs every family
        self.shows_on = shows_on

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        if self.spec_hook is not None:
            spec = self.spec_hook(spec)
        layer = super().create(base_layer, spec)
        if self.patch is not None:
            self.patch(layer, spec)
        return layer


def bind(layer: nn.Module, name: str, fn: Callable[..., Any]) -> None:
    object.__setattr__(layer, name, types.MethodType(fn, layer))


def with_params(**changes: Any) -> Callable[[AdapterSpec], AdapterSpec]:
    def hook(spec: AdapterSpec) -> AdapterSpec:
        params = dict(spec.params)
        for k, v in changes.items():
            if callable(v):
                params = v(spec.method, params)
            else:
                params[k] = v
        return dataclasses.replace(spec, params=params)
    return hook


def twin(clause: str, name: str, *, more: bool = False, shows_on: str | None = None) -> Callable[[Patch], Patch]:
    """Declare the decorated patch the broken twin ``name`` of ``clause``, next to its code: it is entered into its
    module's ``BROKEN`` table (one twin per clause) or, with ``more``, appended to its ``MORE`` list. ``shows_on``:
    a case family the bug shows on (``"lora/4bit"``; ``Broken.shows_on``), for a clause slow to run on every family."""

    def record(patch: Patch) -> Patch:
        tables = sys.modules[patch.__module__].__dict__
        if more:
            tables["MORE"].append((clause, Broken(name, patch, shows_on=shows_on)))
        elif clause in tables["BROKEN"]:
            raise ValueError(f"{patch.__module__}: a second broken twin for {clause} ({name}); use more=True")
        else:
            tables["BROKEN"][clause] = Broken(name, patch, shows_on=shows_on)
        return patch

    return record


def twins(areas: Iterable[str]) -> dict[str, Broken]:
    """The ``BROKEN`` tables of ``areas``, merged (clause ID -> its broken twin)."""
    out: dict[str, Broken] = {}
    for area in sorted(areas):
        out.update(importlib.import_module(f"conformance.clauses.{area}.broken").BROKEN)
    return out


def more_twins(areas: Iterable[str]) -> list[tuple[str, Broken]]:
    """The ``MORE`` lists of ``areas`` (those that have one), in the order given."""
    out: list[tuple[str, Broken]] = []
    for area in areas:
        out += getattr(importlib.import_module(f"conformance.clauses.{area}.broken"), "MORE", [])
    return out


def cache_base_forward(layer: nn.Module) -> dict[str, Any]:
    """Bind to ``layer`` a base forward that dequantizes the base once, at its first call, and computes from that
    copy afterwards (whatever happens to the base since); returns the cache, which a twin may clear."""
    from conformance.quant import layers as qlayers

    cache: dict[str, Any] = {}

    def base_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if "w" not in cache:
            bias = getattr(self.base_layer, "bias", None)
            cache["w"] = qlayers.dequantize(self.base_layer)
            cache["b"] = None if bias is None else bias.detach().float()
        y = x.float() @ cache["w"].t().to(x.device)
        if cache["b"] is not None:
            y = y + cache["b"].to(x.device)
        return y.to(x.dtype)

    bind(layer, "_base_forward", base_forward)
    return cache
