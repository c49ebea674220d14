"""Adopters' expected-failure lists (array-api-tests style).

One entry a line: ``CLAUSE_ID IMPL_PATTERN reason...``; ``#`` starts a comment. Both the clause ID
and the implementation are glob patterns (``MERGE-*``, ``peft*``). A failed or errored clause that
matches becomes ``xfailed``; a passing one ``xpassed`` (so a fixed bug is noticed).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path


class XfailFileError(ValueError):
    """The xfail file cannot be read or a line is malformed; the message names file and line."""


@dataclass(frozen=True)
class Xfail:
    clause: str
    implementation: str
    reason: str
    line: int

    def matches(self, clause_id: str, implementation: str) -> bool:
        return fnmatch.fnmatchcase(clause_id, self.clause) and fnmatch.fnmatchcase(implementation, self.implementation)


def parse(text: str, source: str = "<xfails>") -> list[Xfail]:
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            raise XfailFileError(
                f"{source}:{n}: expected 'CLAUSE_ID IMPL_PATTERN reason', got {raw.strip()!r} (a reason is required)"
            )
        out.append(Xfail(parts[0], parts[1], parts[2], n))
    return out


def load(path: str | Path) -> list[Xfail]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise XfailFileError(f"cannot read xfail file {p}: {exc.strerror or exc}") from None
    return parse(text, str(p))


def find(xfails: list[Xfail], clause_id: str, implementation: str) -> Xfail | None:
    for x in xfails:
        if x.matches(clause_id, implementation):
            return x
    return None
