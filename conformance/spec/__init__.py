"""Deprecated: the clauses moved to ``conformance.clauses`` (one package per area).

This package keeps the old public names importable (``conformance.spec.interface``, ``conformance.spec.clauses``,
``conformance.spec.cases``, ``conformance.spec.stateful.reproducer.reproduce``, ...) for code and stored
reproducer scripts written against them. Each old module is the new module under its old name, and importing it
warns once with a ``DeprecationWarning`` that names the new path.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

#: old module -> the module it now is
MOVED = {
    "conformance.spec": "conformance.clauses",
    "conformance.spec.interface": "conformance.clauses.interface",
    "conformance.spec.clauses": "conformance.clauses.clause",
    "conformance.spec.cases": "conformance.clauses.cases",
    "conformance.spec.budget": "conformance.clauses.budget",
    "conformance.spec.observe": "conformance.clauses.observe",
    "conformance.spec.strategies": "conformance.clauses.strategies",
    "conformance.spec.stateful": "conformance.clauses.stateful",
    **{f"conformance.spec.stateful.{m}": f"conformance.clauses.stateful.{m}"
       for m in ("config", "driver", "invalid", "machine", "model", "ops", "reproducer", "run", "shrink")},
}


def moved(old: str) -> ModuleType:
    """Warn that ``old`` moved and return the module it now is (called once, when the old module is imported)."""
    new = MOVED[old]
    warnings.warn(f"{old} is deprecated: import {new} instead", DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)


def _alias(old: str) -> None:
    """Make the module ``old`` (being imported now) the new module itself, so names and objects are shared."""
    sys.modules[old] = moved(old)


from conformance.clauses import (  # noqa: E402 - the public names of the old package, after the warning
    AdapterSpec,
    Clause,
    ClauseFailure,
    ClauseSkipped,
    Implementation,
    ImplementationBase,
    check,
    declare,
    registry,
    select,
)

moved(__name__)

__all__ = [
    "AdapterSpec", "Clause", "ClauseFailure", "ClauseSkipped", "Implementation", "ImplementationBase",
    "check", "declare", "registry", "select",
]
