"""A clause's outcome and what it means for a run: the one definition every part uses.

``Outcome`` is a ``str``-valued enum: its value is the string the JSON reports have always held
(``"passed"``, ``"failed"``, ...), it compares equal to that string and serializes as it, so a report
read back with ``json.load`` and a ``Result`` built in this process agree. The predicates below are the
only place that says which outcomes fail a run; the report summary, the exit status, ``compare``,
``join``, the matrix report and the pytest adapter all ask them.

Standard library only (no torch): nox's interpreter and the torch-free CLI import it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

#: exit codes of ``python -m conformance run`` (README, "Exit codes of `run`"; docs/running.md)
EXIT_OK = 0  #: no MUST clause failed, errored or was inconclusive, no strict xpass, something was checked
EXIT_FAIL = 1  #: a MUST clause failed, errored or was inconclusive, or a listed known bug passed (xpassed)
EXIT_USAGE = 2  #: bad usage: one line naming the problem and the fix, found before anything runs
EXIT_NOTHING_CHECKED = 3  #: no failure, but for some implementation no clause ran (every one skipped)
EXIT_INTERRUPTED = 130  #: Ctrl-C (the partial report is written; a second Ctrl-C exits at once, writing nothing)
EXIT_BROKEN_PIPE = 141  #: 128 + SIGPIPE: the reader of the output left early (`conformance clauses | head`)

#: the levels of a clause (``conformance.clauses.clause``): only MUST clauses fail a run
MUST, SHOULD = "MUST", "SHOULD"


class Outcome(str, enum.Enum):
    """What one clause gave for one implementation (its value is the report's JSON string)."""

    PASSED = "passed"  #: the implementation does what the clause says
    FAILED = "failed"  #: it does not (the message says how)
    ERROR = "error"  #: the check could not run: an exception, a crash or a timeout
    INCONCLUSIVE = "inconclusive"  #: the implementation cut the check short: too little ran for a verdict
    SKIPPED = "skipped"  #: the clause does not apply (a capability not declared, a device)
    XFAILED = "xfailed"  #: failed (or errored, with the [error] marker) as a listed known bug
    XPASSED = "xpassed"  #: passed although listed as a known bug (strict: fails the run, as under pytest)

    def __str__(self) -> str:  # "passed", not "Outcome.PASSED" (also in f-strings on Python >= 3.11)
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def is_failure(self) -> bool:
        """The implementation was not shown to conform: ``failed``, ``error`` or ``inconclusive``."""
        return self in _FAILURES

    @property
    def is_finding(self) -> bool:
        """Worth listing with its message: a failure, or a listed known bug that passed (``xpassed``)."""
        return self in _FAILURES or self is Outcome.XPASSED

    @property
    def ran(self) -> bool:
        """The check ran (whatever it found): every outcome but ``skipped``."""
        return self is not Outcome.SKIPPED

    def counts_for_exit(self, level: str) -> bool:
        """Whether this outcome of a clause of ``level`` fails the run (exit 1): a failure of a MUST clause,
        or an ``xpassed`` at any level (strict, as under pytest; a non-strict entry leaves it ``passed``)."""
        return (self.is_failure and level == MUST) or self is Outcome.XPASSED

    def covered_by_xfail(self, covers_error: bool = False) -> bool:
        """Whether an xfail entry turns this outcome into ``xfailed``: ``failed`` and ``inconclusive``,
        and ``error`` only for an entry with the ``[error]`` marker (so a known failure that starts
        crashing is still reported)."""
        return self in (Outcome.FAILED, Outcome.INCONCLUSIVE) or (self is Outcome.ERROR and covers_error)

    @classmethod
    def worst(cls, outcomes: Iterable[Outcome | str]) -> Outcome:
        """The outcome of several (a clause's case families): the first of ``SEVERITY`` present.
        ValueError for none."""
        present = {cls(o) for o in outcomes}
        if not present:
            raise ValueError("Outcome.worst of no outcome")
        return next(o for o in SEVERITY if o in present)


_FAILURES = frozenset({Outcome.FAILED, Outcome.ERROR, Outcome.INCONCLUSIVE})

#: every outcome, in report column order
OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)

#: worst first: a failed family decides a clause over an erroring one, and so on down to skipped
SEVERITY: tuple[Outcome, ...] = (Outcome.FAILED, Outcome.ERROR, Outcome.XPASSED, Outcome.INCONCLUSIVE,
                                 Outcome.XFAILED, Outcome.PASSED, Outcome.SKIPPED)

@dataclass(frozen=True)
class Mark:
    """How the reports show an outcome: a plain-text mark (the join of reports, the matrix report), a symbol (the
    Markdown report) and what the outcome means (its legend)."""

    text: str
    symbol: str
    meaning: str


#: the one table of outcome marks, every outcome in report column order
MARKS: dict[Outcome, Mark] = {
    Outcome.PASSED: Mark("pass", "✅", "the implementation does what the clause says"),
    Outcome.FAILED: Mark("FAIL", "❌", "it does not (the message says how)"),
    Outcome.ERROR: Mark("ERROR", "💥", "the check could not run: an exception, a crash or a timeout"),
    Outcome.INCONCLUSIVE: Mark("INCONCL", "❔", "the check ran too little to give a verdict"),
    Outcome.SKIPPED: Mark("skip", "➖", "the clause does not apply (capability, device)"),
    Outcome.XFAILED: Mark("xfail", "⚠️ xfail", "failed or errored, as a listed known bug"),
    Outcome.XPASSED: Mark("XPASS", "❗ xpass", "passed although listed as a known bug"),
}
#: a cell with no result: the plain-text mark (a joined column that did not run the clause) and the symbol (an
#: interrupted run, in the Markdown report)
NOT_RUN = Mark("—", "⏹️", "the run was interrupted before this clause")
#: the plain-text marks alone (the join of reports and the matrix report)
TEXT_MARKS: dict[Outcome, str] = {o: m.text for o, m in MARKS.items()}


def text_mark(outcome: Outcome | str | None) -> str:
    """A cell of a plain-text table: the outcome's mark, ``NOT_RUN.text`` for none."""
    return NOT_RUN.text if outcome is None else MARKS[Outcome(outcome)].text


def counts_for_exit(outcome: Outcome | str, level: str) -> bool:
    """``Outcome(outcome).counts_for_exit(level)`` for a result read from JSON (a plain string)."""
    return Outcome(outcome).counts_for_exit(level)


def exit_status(results: Iterable[tuple[str, Outcome | str, str]]) -> int:
    """The exit status of a run from (implementation, outcome, level) triples:

    ``EXIT_FAIL`` if any result counts for the exit status (``Outcome.counts_for_exit``); else
    ``EXIT_NOTHING_CHECKED`` if some implementation of the run has results and none of them ran (every
    clause skipped); else ``EXIT_OK``.
    """
    ran: dict[str, bool] = {}
    failed = False
    for impl, outcome, level in results:
        o = Outcome(outcome)
        failed = failed or o.counts_for_exit(level)
        ran[impl] = ran.get(impl, False) or o.ran
    if failed:
        return EXIT_FAIL
    return EXIT_NOTHING_CHECKED if not all(ran.values()) else EXIT_OK
