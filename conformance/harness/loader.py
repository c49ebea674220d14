"""How an implementation under test is found: by built-in name, entry point, ``module:attr`` or $CONFORMANCE_IMPL."""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Any

from conformance.clauses.interface import (
    Implementation,
    ImplementationNotFound,
    ImplementationUnsupported,
    InvalidImplementation,
    validate,
)

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "ENV_VAR", "ImplementationNotFound", "ImplementationUnsupported",
           "InvalidImplementation", "available", "load"]

ENV_VAR = "CONFORMANCE_IMPL"
ENTRY_POINT_GROUP = "conformance.implementations"

BUILTIN = {
    "reference": "conformance.impls.reference:ReferenceImplementation",
    "peft": "conformance.impls.peft:PeftImplementation",
    "litgpt": "conformance.impls.litgpt:LitgptImplementation",
    "adapters": "conformance.impls.adapters:AdaptersImplementation",
}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names usable with ``--impl`` (built-ins and installed entry points)."""
    return sorted({*BUILTIN, *_entry_points()})


def _from_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImplementationNotFound(f"cannot import {module_name!r} for implementation {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split(".") if attr else []:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImplementationNotFound(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _instantiate(obj: Any, label: str) -> Implementation:
    """The implementation ``obj`` names: an instance as is, a class or zero-argument factory called.

    ``module:attr`` naming an instance (``impl = MyImpl(rank_cap=8)``) keeps the constructor's arguments:
    workers import the same attribute again (whoever loads by a string keeps the string: workers rebuild from
    it, the stateful machine writes it into reproducers). The object is validated (``interface.validate``),
    never patched.
    """
    if isinstance(obj, type):
        obj = obj()
    elif callable(obj) and not hasattr(obj, "create"):
        obj = obj()
    validate(obj, label)
    return obj


def load(name: str | None = None) -> Implementation:
    """Resolve an implementation: built-in name, entry point, ``package.module:attr``, or $CONFORMANCE_IMPL."""
    name = name or os.environ.get(ENV_VAR) or "reference"
    if name in BUILTIN:
        return _instantiate(_from_target(BUILTIN[name]), name)
    eps = _entry_points()
    if name in eps:
        return _instantiate(eps[name].load(), name)
    if ":" in name or "." in name:
        return _instantiate(_from_target(name), name)
    raise ImplementationNotFound(
        f"unknown implementation {name!r}; known: {', '.join(available())}, "
        "or give package.module:attr (or set $CONFORMANCE_IMPL)"
    )
