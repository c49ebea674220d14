"""The clause registry: every requirement the suites check, with a stable ID.

One source of truth (array-api-tests style): a check function is registered with the
``@clause(...)`` decorator next to its code in ``conformance.spec.checks``; the CLI runner and the
pytest suites both iterate ``registry()`` and call the same function.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .context import CheckContext

Level = Literal["MUST", "SHOULD"]
METHODS = frozenset({"lora", "oft"})
BITS = frozenset({4, 8})
DEVICES = frozenset({"cpu", "cuda"})
_ID = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)+$")


@dataclass(frozen=True)
class Clause:
    """One requirement: ID, level, one sentence, where it comes from and where it applies."""

    id: str
    level: Level
    text: str
    source: str
    check: Callable[[CheckContext], None] = field(compare=False, repr=False)
    methods: frozenset[str] = METHODS
    bits: frozenset[int] = BITS
    devices: frozenset[str] = DEVICES
    requires: frozenset[str] = frozenset()
    area: str = ""
    slow: bool = False
    timeout_s: float = 300.0

    def to_json(self) -> dict:
        return {
            "id": self.id, "level": self.level, "text": self.text, "source": self.source, "area": self.area,
            "methods": sorted(self.methods), "bits": sorted(self.bits), "devices": sorted(self.devices),
            "requires": sorted(self.requires), "slow": self.slow,
        }


_REGISTRY: dict[str, Clause] = {}


def clause(
    id: str,
    level: Level,
    text: str,
    *,
    source: str,
    methods: Iterable[str] = METHODS,
    bits: Iterable[int] = BITS,
    devices: Iterable[str] = DEVICES,
    requires: Iterable[str] = (),
    area: str = "",
    slow: bool = False,
    timeout_s: float = 300.0,
) -> Callable[[Callable[[CheckContext], None]], Callable[[CheckContext], None]]:
    """Register the decorated ``check(ctx)`` as the check of clause ``id``.

    A check raises ``ClauseFailure`` (``ctx.fail``) or ``AssertionError`` to fail, ``ClauseSkipped``
    (``ctx.skip``) to skip, records numbers with ``ctx.measure`` and returns normally to pass.
    """
    if not _ID.match(id):
        raise ValueError(f"clause id {id!r} must look like AREA-WHAT (upper case, dashes)")
    if level not in ("MUST", "SHOULD"):
        raise ValueError(f"clause {id}: level must be MUST or SHOULD, got {level!r}")
    if not source:
        raise ValueError(f"clause {id}: a source (seed file, upstream file or paper) is required")
    methods_, bits_, devices_ = frozenset(methods), frozenset(bits), frozenset(devices)
    if not methods_ <= METHODS or not bits_ <= BITS or not devices_ <= DEVICES:
        raise ValueError(f"clause {id}: methods/bits/devices must be subsets of {METHODS}/{BITS}/{DEVICES}")

    def register(fn: Callable[[CheckContext], None]) -> Callable[[CheckContext], None]:
        if id in _REGISTRY and _REGISTRY[id].check is not fn:
            raise ValueError(f"clause {id} registered twice ({_REGISTRY[id].check.__module__} and {fn.__module__})")
        _REGISTRY[id] = Clause(
            id=id, level=level, text=text, source=source, check=fn, methods=methods_, bits=bits_,
            devices=devices_, requires=frozenset(requires), area=area or fn.__module__.rsplit(".", 1)[-1],
            slow=slow, timeout_s=timeout_s,
        )
        fn.clause_id = id  # type: ignore[attr-defined]
        return fn

    return register


def registry() -> dict[str, Clause]:
    """All clauses, by ID, in registration order (importing every check module first)."""
    from . import checks  # noqa: F401  (registers the clauses)

    return dict(_REGISTRY)


def select(patterns: Iterable[str] | None = None, *, include_slow: bool = True) -> list[Clause]:
    """Clauses whose ID matches any glob pattern (``MERGE-*``), or all of them."""
    pats = [p for p in (patterns or []) if p]
    out = []
    for c in registry().values():
        if pats and not any(fnmatch.fnmatchcase(c.id, p.upper()) for p in pats):
            continue
        if c.slow and not include_slow:
            continue
        out.append(c)
    return out


def get(clause_id: str) -> Clause:
    reg = registry()
    try:
        return reg[clause_id]
    except KeyError:
        close = [c for c in reg if clause_id.upper().split("-")[0] in c]
        raise KeyError(f"unknown clause {clause_id!r}" + (f"; similar: {close[:5]}" if close else "")) from None
