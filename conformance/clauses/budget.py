"""How much work a run spends on its randomised clauses: configuration, carried by the check context.

The CI defaults are what ``nox -s tests`` and ``python -m conformance run`` use; longer runs pass a
larger ``Budget`` (``python -m conformance run --examples N``, ``python -m conformance stateful``); the slow tier
(``run --slow``) is a budget too: ``Budget.slow``.
No check reads an environment variable for its budget.

A budget also carries the work its clauses share (``Budget.shared``, a :class:`SharedRuns`): the STATE-*
clauses all report from one state-machine run per implementation and device. Whoever runs the clauses
makes the budget, so the shared work lives as long as that run: one batch of a worker
(``conformance.harness.worker``), one implementation's checks (``conformance.testing``), one test. A new
budget starts with nothing shared; there is no process-wide cache.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class SharedRuns:
    """Results computed once and shared by the clauses run under one :class:`Budget`.

    ``get(owner, key, make)`` returns what ``make()`` returned the first time for this ``owner`` (the
    implementation object, compared by identity: an entry is never handed to another object) and ``key``.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[int, Hashable], tuple[object, Any]] = {}

    def get(self, owner: object, key: Hashable, make: Callable[[], T]) -> T:
        slot = (id(owner), key)
        hit = self._runs.get(slot)
        if hit is not None and hit[0] is owner:
            return hit[1]
        value = make()
        self._runs[slot] = (owner, value)  # holding the owner keeps its id from being reused meanwhile
        return value

    def __len__(self) -> int:
        return len(self._runs)


@dataclass(frozen=True)
class Budget:
    """Example counts of the hypothesis-driven clauses, and the work its clauses share.

    ``property_examples``: examples per (method, bits) case of a property clause (merge, safe merge).
    ``stateful_examples`` / ``stateful_steps``: examples per (method, bits) case of the state machine,
    and steps per example. ``stateful_shrink_s``: seconds of shrinking per case after its first violation.
    ``slow``: the slow tier: the clauses that take their base layers from the base-layer matrix
    (``Clause.tiered``, ``CheckContext.base_matrix``) run its full product instead of a covering of every pair
    (``python -m conformance run --slow``; pytest's slow tier). Each such verdict records the coverage it ran.
    ``shared``: results the clauses run under this budget share (not configuration: never compared,
    printed or serialised).
    """

    property_examples: int = 24
    stateful_examples: int = 30
    stateful_steps: int = 15
    stateful_shrink_s: float = 20.0
    slow: bool = False
    shared: SharedRuns = field(default_factory=SharedRuns, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("property_examples", "stateful_examples", "stateful_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"Budget.{name} must be at least 1, got {getattr(self, name)}")
        if self.stateful_shrink_s < 0:
            raise ValueError(f"Budget.stateful_shrink_s must be >= 0, got {self.stateful_shrink_s}")

    def to_json(self) -> dict[str, float]:
        return {"property_examples": self.property_examples, "stateful_examples": self.stateful_examples,
                "stateful_steps": self.stateful_steps, "stateful_shrink_s": self.stateful_shrink_s, "slow": self.slow}


CI = Budget()
