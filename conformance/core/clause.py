"""A clause: one numbered requirement, its level, its source and where it applies (standard library only).

``conformance.clauses.clause.declare`` builds them (the torch-free catalog) and binds their checks;
``conformance.core.applicability`` decides from a clause's scope which of an implementation's case
families it applies to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from conformance.core.vocabulary import BITS, ORACLE_METHODS, Capability, Method

Level = Literal["MUST", "SHOULD"]
LEVELS: tuple[Level, ...] = ("MUST", "SHOULD")
#: a clause that names no methods applies to the methods with a hand oracle (the TWIN-* clauses name theirs)
ALL_METHODS: frozenset[Method] = ORACLE_METHODS
ALL_BITS: frozenset[int] = frozenset(BITS)
DEVICES: frozenset[str] = frozenset({"cpu", "cuda"})


@dataclass(frozen=True)
class Clause:
    """One requirement: ID, level, one sentence, where it comes from and where it applies."""

    id: str
    level: Level
    text: str
    source: str
    methods: frozenset[Method] = ALL_METHODS
    bits: frozenset[int] = ALL_BITS
    devices: frozenset[str] = DEVICES
    requires: frozenset[Capability] = frozenset()
    area: str = ""
    slow: bool = False
    #: its cases come from the base-layer matrix (``clauses.cases.base_matrix``, read through
    #: ``CheckContext.base_matrix``): a covering of every pair of values by default, the full product in the slow
    #: tier; its result records which ran (``details["base_matrix"]``)
    tiered: bool = False
    timeout_s: float = 300.0
    #: the check (``conformance.clauses.clause.registry`` binds it); None in the torch-free catalog
    check: Callable[[Any], None] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "level": self.level, "text": self.text, "source": self.source, "area": self.area,
            "methods": sorted(str(m) for m in self.methods), "bits": sorted(self.bits),
            "devices": sorted(self.devices), "requires": sorted(str(c) for c in self.requires), "slow": self.slow,
            "tiered": self.tiered,
        }
