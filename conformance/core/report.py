"""The conformance report as typed records: ``Result`` (one clause for one implementation), ``Family`` (one case
family of it), ``Report`` (a run), with ``to_json``/``from_json``. The one reader of report files: ``compare``,
``markdown``, ``join``, the matrix report and the GPU job all load through ``load_report``/``Report.from_json``.

JSON, ``schema_version`` "2"::

    {schema_version, generated_at, command, environment,
     implementations: {name: {version, methods, capabilities, unsupported[, python, packages]}},
     clauses: {id: {level, text, source, area}},
     results: [{clause, implementation, outcome, message, duration_s, level, device,
                measurements: {key: number}, details: {key: JSON value}, notes: [text],
                families: {"lora/4bit": {outcome, run, skipped, skip_reasons: {reason: count}[, message]}},
                cases_skipped: {capability: count}, reproducers: [path]}],
     summary: {implementations: {name: {outcome: count, must_failures, total}}, exit_status[, nothing_checked]}
     [, not_run: [{clause, implementation}]]}

``python``/``packages`` name an implementation's own interpreter (``--impl NAME@PYTHON``); ``not_run`` lists what
an interrupted run (Ctrl-C) never reached. ``measurements`` holds numbers only (what ``compare`` follows for
drift); ``details`` the other values a check recorded (names, lists, small tables).

Schema "1" (read, never written) kept notes, the per-family outcome text, the cases skipped per capability and
the reproducer paths inside ``measurements`` (keys ``notes``, ``families``, ``cases_skipped``, ``reproducer``,
``reproducers``), numbers and other values alike, and had no ``families`` before case counts existed: reading it
moves each to its field (a family known only by its outcome text has no counts: ``Family.run is None``).

Standard library only: nox's interpreter (the matrix report, the GPU job) and the torch-free CLI read reports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.core.outcome import MUST, OUTCOMES, Outcome
from conformance.core.vocabulary import Method

SCHEMA_VERSION = "2"
#: the schema versions ``Report.from_json`` reads (the major number before any ".")
READS = ("1", "2")

Number = int | float
#: ``measurements`` keys of schema "1" that are fields of ``Result`` since "2"
_V1_FIELDS = ("notes", "families", "cases_skipped", "reproducer", "reproducers")


class ReportError(ValueError):
    """A report file cannot be read or is not a conformance report (a one-line usage error)."""


def is_number(value: Any) -> bool:
    """A measurement: an int or float (a bool is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Family:
    """One case family (``"lora/4bit"``) of a clause: its outcome and the cases run and skipped."""

    outcome: Outcome  #: the family's outcome
    run: int | None = None  #: cases run; None where a schema "1" report kept only the outcome text
    skipped: int | None = None  #: cases skipped; None as ``run``
    skip_reasons: dict[str, int] = field(default_factory=dict)  #: reason -> cases skipped for it
    message: str = ""  #: why it did not pass (empty when it passed)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)

    @property
    def counted(self) -> bool:
        """Whether the cases were counted (every report since case counts exist)."""
        return self.run is not None

    def text(self) -> str:
        """``passed``, or ``outcome: message`` (schema "1"'s ``measurements["families"]`` value)."""
        return self.outcome.value if self.outcome is Outcome.PASSED else f"{self.outcome}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outcome": self.outcome.value, "run": self.run, "skipped": self.skipped,
                               "skip_reasons": dict(self.skip_reasons)}
        if self.message:
            out["message"] = self.message
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> Family:
        """A family entry, or schema "1"'s outcome text (``passed``, ``failed: message``)."""
        if isinstance(d, str):
            outcome, _, message = d.partition(": ")
            return cls(Outcome(outcome.rstrip(":")), message=message)
        return cls(Outcome(d["outcome"]), d.get("run"), d.get("skipped"), dict(d.get("skip_reasons") or {}),
                   d.get("message") or "")


@dataclass
class Result:
    """One clause's outcome for one implementation.

    ``measurements`` holds numbers only; ``take_measurements`` sorts what a check recorded into ``measurements``,
    ``details``, ``reproducers`` and (schema "1" keys) ``notes``, ``families`` and ``cases_skipped``, and every
    ``Result`` built does so with what it is given (so a schema "1" result reads into its fields)."""

    clause: str  #: the clause ID
    implementation: str  #: the implementation's name
    outcome: Outcome  #: ``conformance.core.outcome.Outcome``: passed, failed, error, inconclusive, skipped, ...
    message: str = ""  #: why it did not pass (or why it was skipped)
    duration_s: float = 0.0  #: wall time of the clause (reported, never asserted)
    measurements: dict[str, Number] = field(default_factory=dict)  #: numbers only (e.g. worst observed / bound)
    level: str = MUST  #: the clause's level
    device: str = "cpu"  #: where it ran
    #: per case family ("lora/4bit"); empty for a clause that did not run (and in schema "1" reports written
    #: before case counts, where only several families left their outcome text)
    families: dict[str, Family] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  #: what the check noted beside its verdict
    cases_skipped: dict[str, int] = field(default_factory=dict)  #: capability not declared -> cases skipped
    reproducers: list[str] = field(default_factory=list)  #: scripts that replay a failure (the first is the main)
    details: dict[str, Any] = field(default_factory=dict)  #: the check's other recorded values (not numbers)

    def __setattr__(self, name: str, value: Any) -> None:
        """An outcome set as its string (from JSON, a worker, ``res.outcome = "skipped"``) is an ``Outcome``
        (ValueError for an unknown one); families set as their JSON are ``Family`` records."""
        if name == "outcome":
            value = Outcome(value)
        elif name == "families":
            value = {k: v if isinstance(v, Family) else Family.from_json(v) for k, v in value.items()}
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        raw, self.measurements = self.measurements, {}
        self.take_measurements(raw)

    def take_measurements(self, raw: dict[str, Any]) -> None:
        """Add what a check recorded: numbers to ``measurements``, reproducer paths to ``reproducers``, the
        schema "1" keys to their fields, anything else to ``details``."""
        for k, v in raw.items():
            if k == "notes" and isinstance(v, list):
                self.notes += [str(n) for n in v if n not in self.notes]
            elif k == "families" and isinstance(v, dict):
                for fam, text in v.items():
                    self.families.setdefault(fam, Family.from_json(text))
            elif k == "cases_skipped" and isinstance(v, dict):
                for cap, n in v.items():
                    self.cases_skipped[cap] = self.cases_skipped.get(cap, 0) + int(n)
            elif k == "reproducer" and isinstance(v, str):
                self.reproducers = [v] + [p for p in self.reproducers if p != v]
            elif k == "reproducers" and isinstance(v, list) and all(isinstance(p, str) for p in v):
                self.reproducers += [p for p in v if p not in self.reproducers]
            elif is_number(v):
                self.measurements[k] = v
            else:
                self.details[k] = v

    def to_json(self) -> dict[str, Any]:
        return {"clause": self.clause, "implementation": self.implementation, "outcome": self.outcome.value,
                "message": self.message, "duration_s": round(self.duration_s, 4), "level": self.level,
                "device": self.device, "measurements": dict(self.measurements), "details": dict(self.details),
                "notes": list(self.notes), "families": {k: f.to_json() for k, f in self.families.items()},
                "cases_skipped": dict(self.cases_skipped), "reproducers": list(self.reproducers)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        """A result of either schema (unknown keys, such as a worker's ``event``, are ignored)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None})

    def family_texts(self) -> dict[str, str]:
        """Each family's outcome in one phrase: ``passed`` or ``outcome: message``."""
        return {f: fam.text() for f, fam in self.families.items()}

    def numeric(self) -> dict[str, float]:
        """The finite measurements (what ``compare`` follows for drift)."""
        return {k: float(v) for k, v in self.measurements.items() if math.isfinite(float(v))}


@dataclass
class ImplementationInfo:
    """What a report says of an implementation that ran."""

    version: str = "unknown"  #: the implementation's ``version()``
    capabilities: list[str] = field(default_factory=list)  #: the capabilities it declares
    unsupported: dict[str, str] = field(default_factory=dict)  #: feature -> why it is not supported
    python: str = ""  #: the interpreter its workers ran in, when not the report's (``--impl NAME@PYTHON``)
    packages: dict[str, str] = field(default_factory=dict)  #: versions installed in ``python``
    #: the adapter methods it declares (``core.vocabulary.Method``); version 1 listed them among the capabilities
    methods: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "methods": list(self.methods),
                               "capabilities": list(self.capabilities), "unsupported": dict(self.unsupported)}
        if self.python:
            out.update(python=self.python, packages=dict(self.packages))
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImplementationInfo:
        caps = [str(c) for c in d.get("capabilities") or []]
        if "methods" in d:
            methods = [str(m) for m in d["methods"]]
        else:  # version 1: methods were capabilities
            names = {m.value for m in Method}
            methods, caps = [c for c in caps if c in names], [c for c in caps if c not in names]
        return cls(str(d.get("version", "unknown")), caps, dict(d.get("unsupported") or {}), d.get("python") or "",
                   dict(d.get("packages") or {}), methods)


@dataclass
class ClauseInfo:
    """A clause as a report lists it."""

    level: str = ""  #: ``MUST`` or ``SHOULD``
    text: str = ""  #: the requirement, one sentence
    source: str = ""  #: the upstream file, version or paper it comes from
    area: str = ""  #: its area (``merge``, ``forward``, ...)

    def to_json(self) -> dict[str, str]:
        return {"level": self.level, "text": self.text, "source": self.source, "area": self.area}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClauseInfo:
        return cls(d.get("level") or "", d.get("text") or "", d.get("source") or "", d.get("area") or "")


@dataclass
class Report:
    """A run: its environment (the fingerprint), the implementations, the clauses, one ``Result`` per (clause,
    implementation), the summary and, for an interrupted run, what was never reached."""

    results: list[Result] = field(default_factory=list)  #: one per (clause, implementation) that was reached
    implementations: dict[str, ImplementationInfo] = field(default_factory=dict)  #: name -> what ran
    clauses: dict[str, ClauseInfo] = field(default_factory=dict)  #: ID -> the clause as listed
    #: the fingerprint: Python, torch and its build, bitsandbytes, transformers, peft, accelerate, the GPU or CPU
    #: model, ``cpu_dispatch`` (the CPU features torch and bitsandbytes dispatch on, what bitsandbytes' CPU backend
    #: chose), suite version, git sha and a hash of the suite's sources (``conformance.harness.environment``)
    environment: dict[str, Any] = field(default_factory=dict)
    #: ``{implementations: {name: {outcome: count, must_failures, total}}, exit_status[, nothing_checked]}``
    summary: dict[str, Any] = field(default_factory=dict)
    generated_at: str = ""  #: when the report was built (ISO 8601, UTC)
    command: str = ""  #: the command line that ran it
    not_run: list[dict[str, str]] | None = None  #: (clause, implementation) pairs an interrupted run never reached
    schema_version: str = SCHEMA_VERSION  #: as read (a report read from schema "1" says "1"); written as "2"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "generated_at": self.generated_at, "command": self.command,
            "environment": self.environment,
            "implementations": {n: i.to_json() for n, i in self.implementations.items()},
            "clauses": {c: i.to_json() for c, i in self.clauses.items()},
            "results": [r.to_json() for r in self.results], "summary": self.summary}
        if self.not_run is not None:
            doc["not_run"] = [dict(x) for x in self.not_run]
        return doc

    @classmethod
    def from_json(cls, doc: Any, source: str = "report") -> Report:
        """A report of schema "1" or "2"; ``ReportError`` naming ``source`` for anything else."""
        if not (isinstance(doc, dict) and isinstance(doc.get("results"), list)):
            raise ReportError(f"{source} is not a conformance report (no schema_version/results)")
        # a file must say its version (``load_report``); a document built in memory without one reads as "1"
        version = str(doc.get("schema_version", "1")).split(".")[0]
        if version not in READS:
            raise ReportError(f"{source} has schema_version {doc['schema_version']}, this tool reads "
                              f"{' and '.join(READS)}")
        clauses = {c: ClauseInfo.from_json(i or {}) for c, i in (doc.get("clauses") or {}).items()}
        results = []
        for r in doc["results"]:
            where = f"{source}: result {r.get('clause')} [{r.get('implementation')}]" if isinstance(r, dict) else ""
            if not isinstance(r, dict) or not {"clause", "implementation", "outcome"} <= r.keys():
                raise ReportError(f"{where or source + ': a result'} lacks clause, implementation or outcome")
            if r["outcome"] not in OUTCOMES:
                raise ReportError(f"{where} has outcome {r['outcome']!r}, not one of {', '.join(OUTCOMES)}")
            try:  # a result without a level takes its clause's (else MUST)
                results.append(Result.from_json({"level": (clauses.get(r["clause"]) or ClauseInfo()).level or MUST,
                                                 **r}))
            except (TypeError, ValueError, AttributeError) as exc:
                raise ReportError(f"{where} is malformed: {exc}") from None
        return cls(results=results,
                   implementations={n: ImplementationInfo.from_json(i or {})
                                    for n, i in (doc.get("implementations") or {}).items()},
                   clauses=clauses,
                   environment=dict(doc.get("environment") or {}), summary=dict(doc.get("summary") or {}),
                   generated_at=doc.get("generated_at") or "", command=doc.get("command") or "",
                   not_run=[dict(x) for x in doc["not_run"]] if doc.get("not_run") is not None else None,
                   schema_version=version)


def is_report(doc: Any) -> bool:
    """Whether a JSON document is a conformance report: an object with a ``schema_version`` and a ``results``
    list. The other JSON stored in ``baselines/`` is not: the clone probe and the matrix join have no ``results``,
    the benchmarks no ``schema_version`` (their ``format`` instead), the step logs neither."""
    return isinstance(doc, dict) and "schema_version" in doc and isinstance(doc.get("results"), list)


def load_report(path: str | Path) -> Report:
    """Read a report file (schema "1" or "2"); ``ReportError`` with one line saying why not."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read report {p}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{p} is not JSON: {exc}") from None
    if not is_report(doc):
        raise ReportError(f"{p} is not a conformance report (no schema_version/results)")
    return Report.from_json(doc, source=str(p))


def as_report(doc: Report | dict[str, Any]) -> Report:
    """A ``Report`` from one or from its JSON document (already parsed)."""
    return doc if isinstance(doc, Report) else Report.from_json(doc)


__all__ = ["OUTCOMES", "READS", "SCHEMA_VERSION", "ClauseInfo", "Family", "ImplementationInfo", "Number", "Report",
           "ReportError", "Result", "as_report", "is_number", "is_report", "load_report"]
