"""Adopters' expected-failure lists (array-api-tests style).

One entry a line: ``CLAUSE_ID IMPL_PATTERN [MARKERS] reason...``; ``#`` starts a comment. Both the
clause ID and the implementation are glob patterns (``MERGE-*``, ``peft*``). Optional markers, in
square brackets right after the implementation pattern:

- ``[error]``: the entry also covers an ``error`` outcome (a crash while checking). Without it an
  entry covers ``failed`` and ``inconclusive`` only, so an expected failure that starts crashing is
  still reported;
- ``[non-strict]``: a ``passed`` clause stays ``passed`` (with a note) instead of becoming
  ``xpassed``: for an upstream bug that reproduces only on some machines (CPU features, versions).

A covered clause that passes is ``xpassed`` (strict: it counts as a failure, so a fixed bug is
noticed) unless the entry is non-strict or the run relaxes strictness (``apply(..., strict=False)``).
An entry whose clause pattern matches no declared clause is a usage error (``XfailFileError``,
exit 2); an entry that matched no result of a run is warned about (``unmatched``; entries for
clauses the run did not select are not).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.core.outcome import Outcome

if TYPE_CHECKING:
    from conformance.harness.results import Result

MARKERS = {"error": "also covers outcome 'error'", "non-strict": "a pass is not flagged as xpassed"}
_MARKER = re.compile(r"^\[([a-z-]+(?:\s*,\s*[a-z-]+)*)\]$")


class XfailFileError(ValueError):
    """The xfail file cannot be read, a line is malformed or names an unknown clause; the message names file
    and line."""


@dataclass(frozen=True)
class Xfail:
    clause: str
    implementation: str
    reason: str
    line: int
    markers: frozenset[str] = field(default_factory=frozenset)
    source: str = "<xfails>"

    @property
    def covers_error(self) -> bool:
        return "error" in self.markers

    @property
    def strict(self) -> bool:
        return "non-strict" not in self.markers

    def matches(self, clause_id: str, implementation: str) -> bool:
        return fnmatch.fnmatchcase(clause_id, self.clause) and fnmatch.fnmatchcase(implementation, self.implementation)

    def covers(self, outcome: str) -> bool:
        """Whether a result with ``outcome`` becomes ``xfailed`` under this entry."""
        return Outcome(outcome).covered_by_xfail(self.covers_error)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def parse(text: str, source: str = "<xfails>", known_clauses: Iterable[str] | None = None) -> list[Xfail]:
    """Entries of an xfail file; with ``known_clauses``, an entry matching none of them is an error."""
    known = list(known_clauses) if known_clauses is not None else None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            raise XfailFileError(
                f"{source}:{n}: expected 'CLAUSE_ID IMPL_PATTERN [MARKERS] reason', got {raw.strip()!r} "
                "(a reason is required)"
            )
        clause, impl, rest = parts
        markers: set[str] = set()
        first, _, tail = rest.partition(" ")
        m = _MARKER.match(first)
        if m:
            markers = {x.strip() for x in m.group(1).split(",")}
            unknown = sorted(markers - set(MARKERS))
            if unknown:
                raise XfailFileError(f"{source}:{n}: unknown marker(s) {unknown}; markers: "
                                     + ", ".join(f"[{k}] ({v})" for k, v in MARKERS.items()))
            rest = tail.strip()
            if not rest:
                raise XfailFileError(f"{source}:{n}: a reason is required after the markers")
        if known is not None and not any(fnmatch.fnmatchcase(k, clause) for k in known):
            close = difflib.get_close_matches(clause, known, n=3, cutoff=0.6)
            raise XfailFileError(f"{source}:{n}: unknown clause {clause!r}"
                                 + (f"; similar: {', '.join(close)}" if close else "")
                                 + " (list them with `python -m conformance clauses`)")
        out.append(Xfail(clause, impl, rest, n, frozenset(markers), source))
    return out


def _known_clauses() -> list[str]:
    from conformance.clauses.clause import catalog  # torch-free

    return list(catalog())


def load(path: str | Path, *, validate: bool = True) -> list[Xfail]:
    """Read an xfail file; with ``validate`` (the default) every clause pattern must match a declared clause."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise XfailFileError(f"cannot read xfail file {p}: {exc.strerror or exc}") from None
    return parse(text, str(p), _known_clauses() if validate else None)


def find(xfails: list[Xfail], clause_id: str, implementation: str) -> Xfail | None:
    for x in xfails:
        if x.matches(clause_id, implementation):
            return x
    return None


def resolve(outcome: Outcome | str, message: str, entry: Xfail | None, *,
            strict: bool = True) -> tuple[Outcome, str]:
    """(outcome, message) of a result after its xfail entry: the one rule the CLI and pytest share."""
    outcome = Outcome(outcome)
    if entry is None:
        return outcome, message
    if entry.covers(outcome):
        return Outcome.XFAILED, f"{message} [xfail: {entry.reason}]"
    if outcome is Outcome.PASSED:
        if strict and entry.strict:
            return Outcome.XPASSED, f"passed although listed as xfail ({entry.reason}; {entry.where})"
        return Outcome.PASSED, (f"passed although listed as xfail ({entry.reason}; {entry.where}): "
                                "not reproduced here")
    return outcome, message  # skipped, or an error the entry does not cover


def apply(results: list[Result], entries: list[Xfail], *, strict: bool = True) -> list[str]:
    """Rewrite ``results`` in place by their entries; returns one warning per entry that matched no result."""
    used: set[int] = set()
    for r in results:
        entry = find(entries, r.clause, r.implementation)
        if entry is not None:
            used.add(id(entry))
        r.outcome, r.message = resolve(r.outcome, r.message, entry, strict=strict)
    return unmatched(entries, used, results)


def unmatched(entries: list[Xfail], used: set[int], results: list[Result]) -> list[str]:
    """Warnings for entries that matched no result: those naming no implementation of the run, and those
    whose clause ran but never under that entry (an entry for a clause left out by ``--clauses`` is silent)."""
    impls = {r.implementation for r in results}
    clauses = {r.clause for r in results}
    out = []
    for e in entries:
        if id(e) in used:
            continue
        no_impl = not any(fnmatch.fnmatchcase(i, e.implementation) for i in impls)
        ran = any(fnmatch.fnmatchcase(c, e.clause) for c in clauses)
        if no_impl or ran:
            why = "names no implementation of this run" if no_impl else "matched no result of this run"
            out.append(f"{e.where}: xfail entry '{e.clause} {e.implementation}' {why}")
    return out
