"""One clause's outcome for one implementation (torch-free: reports and comparisons use it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from conformance.spec.interface import bits_of, methods_of

if TYPE_CHECKING:
    from conformance.spec.clauses import Clause
    from conformance.spec.interface import Implementation

Outcome = Literal["passed", "failed", "error", "inconclusive", "skipped", "xfailed", "xpassed"]
OUTCOMES: tuple[Outcome, ...] = ("passed", "failed", "error", "inconclusive", "skipped", "xfailed", "xpassed")


@dataclass
class Result:
    clause: str
    implementation: str
    outcome: Outcome
    message: str = ""
    duration_s: float = 0.0
    measurements: dict[str, Any] = field(default_factory=dict)
    level: str = "MUST"
    device: str = "cpu"
    #: per case family ("lora/4bit"): {"outcome", "run", "skipped", "skip_reasons": {reason: count}, "message"}
    #: (``harness.execute``); empty in reports written before it existed and for clauses that did not run
    families: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["duration_s"] = round(self.duration_s, 4)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def applicability(clause: Clause, impl: Implementation, device: str) -> str | None:
    """Why the clause does not apply to this implementation/device (None when it does)."""
    if device not in clause.devices:
        return f"clause applies to devices {sorted(clause.devices)}, not {device}"
    if device == "cuda" and "cuda" not in impl.capabilities:
        return f"{impl.name} does not declare capability cuda"
    if not clause.methods & methods_of(impl):
        return f"{impl.name} implements none of {sorted(clause.methods)}"
    if not clause.bits & bits_of(impl):
        return f"{impl.name} supports none of the bit widths {sorted(clause.bits)}"
    missing = sorted(clause.requires - set(impl.capabilities))
    if missing:
        return f"{impl.name} does not declare capability {', '.join(missing)}"
    return None


def exit_status(results: list[Result]) -> int:
    """1 if any MUST clause failed, errored or was inconclusive (xfailed excepted), or any expected failure
    passed (``xpassed``: strict, as under pytest; a non-strict entry leaves it ``passed``), else 0."""
    return int(any((r.outcome in ("failed", "error", "inconclusive") and r.level == "MUST") or r.outcome == "xpassed"
                   for r in results))
