"""How much work a run spends on its randomised clauses: configuration, carried by the check context.

The CI defaults are what ``nox -s tests`` and ``python -m conformance run`` use; longer runs pass a
larger ``Budget`` (``python -m conformance run --examples N``, ``python -m conformance stateful``).
No check reads an environment variable for its budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Example counts of the hypothesis-driven clauses.

    ``property_examples``: examples per (method, bits) case of a property clause (merge, safe merge).
    ``stateful_examples`` / ``stateful_steps``: examples per (method, bits) case of the state machine,
    and steps per example. ``stateful_shrink_s``: seconds of shrinking per case after its first violation.
    """

    property_examples: int = 24
    stateful_examples: int = 30
    stateful_steps: int = 15
    stateful_shrink_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("property_examples", "stateful_examples", "stateful_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"Budget.{name} must be at least 1, got {getattr(self, name)}")
        if self.stateful_shrink_s < 0:
            raise ValueError(f"Budget.stateful_shrink_s must be >= 0, got {self.stateful_shrink_s}")

    def to_json(self) -> dict[str, float]:
        return {"property_examples": self.property_examples, "stateful_examples": self.stateful_examples,
                "stateful_steps": self.stateful_steps, "stateful_shrink_s": self.stateful_shrink_s}


CI = Budget()
