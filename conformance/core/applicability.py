"""Which clauses, case families and cases apply to an implementation: decided here, in one place.

scikit-learn decides in one place which estimator checks apply (``estimator_checks.py`` reading the
estimator's tags); this module is that place for the suite. ``applicability(clause, declaration,
device)`` gives the clause-level skip reason (a device, a missing method, bit width or capability), the
case families ``(method, bits)`` the clause runs for, and for each family left out by a declared
limitation why. The runner (``harness.execute``), the check context (``CheckContext.methods/bits/cases``),
the report and the stateful machine all ask it; the skip messages are written only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conformance.core.clause import Clause
from conformance.core.vocabulary import Capability, Declaration, Method

Family = tuple[Method, int]


@dataclass(frozen=True)
class Applicability:
    """What of ``clause`` applies to one implementation on one device."""

    #: why the clause does not apply at all (None when it does)
    reason: str | None
    #: the methods and bit widths both the clause and the implementation cover (filled in whatever ``reason``
    #: says, so a check run directly still sees them)
    methods: tuple[Method, ...] = ()
    bits: tuple[int, ...] = ()
    #: method -> (the limited capability, the implementation's reason): families of that method are skipped
    excluded: dict[Method, tuple[Capability, str]] = field(default_factory=dict)

    @property
    def families(self) -> tuple[Family, ...]:
        """The (method, bits) case families the clause runs for when it applies."""
        return tuple((m, b) for m in self.methods for b in self.bits)


def applicability(clause: Clause, decl: Declaration, device: str, name: str = "the implementation") -> Applicability:
    """The one decision (``name`` is the implementation's name, for the messages)."""
    methods = tuple(sorted(clause.methods & decl.methods))
    bits = tuple(sorted(clause.bits & decl.bits))
    excluded: dict[Method, tuple[Capability, str]] = {}
    for m in methods:
        for cap in sorted(clause.requires):
            reason = decl.limitation(cap, m)
            if reason:
                excluded[m] = (cap, reason)
                break
    if device not in clause.devices:
        reason = f"clause applies to devices {sorted(clause.devices)}, not {device}"
    elif device == "cuda" and Capability.CUDA not in decl.capabilities:
        reason = f"{name} does not declare capability cuda"
    elif not clause.methods & decl.methods:
        reason = f"{name} implements none of {sorted(str(m) for m in clause.methods)}"
    elif not clause.bits & decl.bits:
        reason = f"{name} supports none of the bit widths {sorted(clause.bits)}"
    elif missing := sorted(str(c) for c in clause.requires - decl.capabilities):
        reason = f"{name} does not declare capability {', '.join(missing)}"
    else:
        reason = None
    return Applicability(reason, methods, bits, excluded)


def family_label(family: Family) -> str:
    """``lora/4bit``: how reports name a case family."""
    return f"{family[0]}/{family[1]}bit"
