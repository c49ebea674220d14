"""The clause registry: every requirement the suites check, with a stable ID.

One source of truth, in two halves that never disagree:

- ``conformance.clauses.<area>.declare`` declares every clause as data (``declare(...)``: ID, level, text,
  source, scope). It imports no torch, so listing clauses (``python -m conformance clauses``) is fast.
- ``conformance.clauses.<area>.checks`` binds a check function to each ID with ``@check("ID")``.

``catalog()`` gives the declared clauses (torch-free); ``registry()`` imports the checks too and
fails loudly if an ID is declared without a check or checked without a declaration.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from conformance.core import vocabulary
from conformance.core.clause import ALL_BITS, ALL_METHODS, DEVICES, LEVELS, Clause, Level

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

__all__ = ["BITS", "DEVICES", "METHODS", "Clause", "ClauseFailure", "ClauseInconclusive", "ClauseSkipped", "Level",
           "catalog", "check", "declare", "get", "registry", "select"]

METHODS = ALL_METHODS
BITS = ALL_BITS
_PACKAGE = __name__.rpartition(".")[0]  # conformance.clauses: its subpackages are the areas
_ID = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)+$")


class ClauseFailure(AssertionError):
    """The implementation does not do what the clause says."""


class ClauseSkipped(Exception):
    """The clause does not apply (capability not declared, no GPU, ...); the reason says why."""


class ClauseInconclusive(Exception):
    """The check ran but the implementation cut it short (steps raised or were refused), so too little ran to
    give a verdict; the reason says how much ran against the clause's documented floor."""


_CATALOG: dict[str, Clause] = {}
_CHECKS: dict[str, Callable[[CheckContext], None]] = {}


def declare(
    id: str,
    level: Level,
    text: str,
    *,
    source: str,
    methods: Iterable[str] = METHODS,
    bits: Iterable[int] = BITS,
    devices: Iterable[str] = DEVICES,
    requires: Iterable[str] = (),
    area: str,
    slow: bool = False,
    tiered: bool = False,
    timeout_s: float = 300.0,
) -> Clause:
    """Declare clause ``id`` (called at import time of a ``conformance.clauses.<area>.declare`` module)."""
    if not _ID.match(id):
        raise ValueError(f"clause id {id!r} must look like AREA-WHAT (upper case, dashes)")
    if level not in LEVELS:
        raise ValueError(f"clause {id}: level must be MUST or SHOULD, got {level!r}")
    if not source:
        raise ValueError(f"clause {id}: a source (upstream file and version, PR or paper) is required")
    try:  # a misspelled method or capability fails here, at import of the catalog module
        methods_, requires_ = vocabulary.methods(methods), vocabulary.capabilities(requires)
    except vocabulary.UnknownName as exc:
        raise ValueError(f"clause {id}: {exc}") from None
    bits_, devices_ = frozenset(bits), frozenset(devices)
    if not bits_ <= BITS or not devices_ <= DEVICES:
        raise ValueError(f"clause {id}: bits/devices must be subsets of {sorted(BITS)}/{sorted(DEVICES)}")
    if id in _CATALOG:
        raise ValueError(f"clause {id} declared twice")
    c = Clause(id=id, level=level, text=text, source=source, methods=methods_, bits=bits_, devices=devices_,
               requires=requires_, area=area, slow=slow, tiered=tiered, timeout_s=timeout_s)
    _CATALOG[id] = c
    return c


def check(id: str) -> Callable[[Callable[[CheckContext], None]], Callable[[CheckContext], None]]:
    """Bind the decorated ``check(ctx)`` to clause ``id``.

    A check raises ``ClauseFailure`` (``ctx.fail``) or ``AssertionError`` to fail, ``ClauseSkipped``
    (``ctx.skip``) to skip, records numbers with ``ctx.measure`` and returns normally to pass.
    """

    def bind(fn: Callable[[CheckContext], None]) -> Callable[[CheckContext], None]:
        if id in _CHECKS and _CHECKS[id] is not fn:
            raise ValueError(f"clause {id} checked twice ({_CHECKS[id].__module__} and {fn.__module__})")
        _CHECKS[id] = fn
        if not getattr(fn, "clause_ids", None):
            fn.clause_ids = []  # type: ignore[attr-defined]
        fn.clause_ids.append(id)  # type: ignore[attr-defined]
        return fn

    return bind


def areas() -> list[str]:
    """The area packages under ``conformance.clauses`` (each has a ``declare`` and a ``checks`` module), by name."""
    package = importlib.import_module(_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg and not m.name.startswith("_"))


def _import_all(module: str) -> None:
    for area in areas():
        importlib.import_module(f"{_PACKAGE}.{area}.{module}")


def catalog() -> dict[str, Clause]:
    """Every declared clause, by ID, area by area (``areas()`` order) and in declaration order within an area,
    without its check (imports no torch). The order does not depend on which module happened to be imported
    first (a check module imports its own declarations)."""
    _import_all("declare")  # declares the clauses
    rank = {area: i for i, area in enumerate(areas())}
    ordered = sorted(_CATALOG.values(), key=lambda c: rank.get(c.area, len(rank)))  # stable within an area
    return {c.id: c for c in ordered}


def registry() -> dict[str, Clause]:
    """Every clause with its check bound (imports the check modules, hence torch and bitsandbytes)."""
    _import_all("checks")  # binds the checks

    declared = catalog()
    unchecked = sorted(set(declared) - set(_CHECKS))
    undeclared = sorted(set(_CHECKS) - set(declared))
    if unchecked or undeclared:
        raise RuntimeError(f"clauses declared without a check: {unchecked}; checks of undeclared clauses: {undeclared}")
    return {cid: replace(c, check=_CHECKS[cid]) for cid, c in declared.items()}


def select(patterns: Iterable[str] | None = None, *, include_slow: bool = True, bound: bool = True) -> list[Clause]:
    """Clauses whose ID matches any glob pattern (``MERGE-*``), or all of them.

    ``bound=False`` selects from the torch-free catalog (no checks attached).
    """
    pats = [p for p in (patterns or []) if p]
    out = []
    for c in (registry() if bound else catalog()).values():
        if pats and not any(fnmatch.fnmatchcase(c.id, p.upper()) for p in pats):
            continue
        if c.slow and not include_slow:
            continue
        out.append(c)
    return out


def get(clause_id: str, *, bound: bool = True) -> Clause:
    reg = registry() if bound else catalog()
    try:
        return reg[clause_id]
    except KeyError:
        close = [c for c in reg if clause_id.upper().split("-")[0] in c]
        raise KeyError(f"unknown clause {clause_id!r}" + (f"; similar: {close[:5]}" if close else "")) from None
