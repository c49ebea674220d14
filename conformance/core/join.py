"""The one joiner of reports: ``python -m conformance join A.json B.json ...`` and the matrix report
(``conformance.ci.matrix_report``, one report per cell) both put reports side by side through ``join``.
Standard library only (nox's interpreter runs the matrix report).

Each implementation in each report is one column, ``implementation@version`` with its environment
(the interpreter's packages when it ran in its own, ``--impl NAME@PYTHON``, else the report's);
rows are the clauses of all reports in their first report's order; a cell is the outcome's mark
(``conformance.core.outcome.MARKS``' plain text; ``—`` where that column did not run the clause). Per column the outcome counts; per
clause the messages of every column that failed, errored, was inconclusive or xpassed (the
findings), and ``first_change``: the first column (in the order given) whose outcome differs from
the column before it, so a report list ordered by release says where each clause changed.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conformance.core.outcome import MUST, NOT_RUN, OUTCOMES, TEXT_MARKS, Outcome, text_mark
from conformance.core.report import Report, ReportError

SCHEMA = "conformance-join/1"
#: What a cell shows for each outcome (``conformance.core.outcome.MARKS``: also the matrix report's).
MARKS = TEXT_MARKS
#: outcomes whose message is a finding (listed under the table): ``Outcome.is_finding``
FINDINGS = tuple(o for o in OUTCOMES if o.is_finding)
#: packages an environment label names, with their short names
LABEL_PACKAGES = (("torch", "torch"), ("bitsandbytes", "bnb"), ("transformers", "transformers"), ("peft", "peft"),
                  ("litgpt", "litgpt"), ("adapters", "adapters"))


class JoinError(ValueError):
    """Reports that cannot be joined (none given, unreadable, ...): a one-line usage error."""


def mark(outcome: str | None) -> str:
    """A cell: the outcome's plain-text mark, ``—`` where the column did not run the clause."""
    return text_mark(outcome)


def env_label(packages: dict[str, str]) -> str:
    """``torch 2.13.0+cpu · bnb 0.50.2 · transformers 4.53.3`` from a packages mapping."""
    return " · ".join(f"{short} {packages[name]}" for name, short in LABEL_PACKAGES if packages.get(name))


def _columns(rep: Report, source: str) -> list[dict[str, Any]]:
    env_pk = dict(rep.environment.get("packages") or {})
    cols = []
    for name, info in rep.implementations.items():
        pk = dict(info.packages) if info.python else env_pk  # its own interpreter's
        cols.append({"id": f"{name}@{info.version}", "implementation": name,
                     "version": info.version, "environment": env_label(pk), "packages": pk,
                     "python": info.python or rep.environment.get("python", ""),
                     "device": rep.environment.get("device", ""), "report": source})
    return cols


def _report(source: str, doc: Report | dict[str, Any]) -> Report:
    if isinstance(doc, Report):
        return doc
    try:
        return Report.from_json(doc, source=source)
    except ReportError as exc:
        raise JoinError(str(exc)) from None


def join(docs: Sequence[tuple[str, Report | dict[str, Any]]]) -> dict[str, Any]:
    """The joined document from (source name, report) pairs, columns in the order given."""
    if not docs:
        raise JoinError("give at least one report to join")
    columns: list[dict[str, Any]] = []
    clauses: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, dict[str, str]]] = {}
    for source, doc in docs:
        rep = _report(source, doc)
        cols = _columns(rep, source)
        ids = [c["id"] for c in columns]
        for col in cols:  # the same implementation@version twice: tell the columns apart by environment
            if col["id"] in ids:
                col["id"] = f"{col['id']} ({col['environment'] or Path(source).stem})"
            if col["id"] in ids:  # the same report twice
                col["id"] = f"{col['id']} #{len(ids) + 1}"
            ids.append(col["id"])
        by_name = {c["implementation"]: c["id"] for c in cols}
        for cid, meta in rep.clauses.items():
            clauses.setdefault(cid, {"level": meta.level, "text": meta.text, "area": meta.area})
        for r in rep.results:
            col = by_name.get(r.implementation)
            if col is None:
                raise JoinError(f"{source}: result {r.clause} [{r.implementation}] names no listed "
                                f"implementation or has outcome {r.outcome.value!r}")
            clauses.setdefault(r.clause, {"level": r.level, "text": "", "area": ""})
            cells.setdefault(r.clause, {})[col] = {"outcome": r.outcome.value, "message": r.message}
        columns += cols
    order = [c["id"] for c in columns]
    summary = {c: {o.value: 0 for o in OUTCOMES} | {"not_run": 0, "must_failures": 0} for c in order}
    first_change: dict[str, str] = {}
    for cid in clauses:
        row = cells.get(cid, {})
        for c in order:
            cell = row.get(c)
            summary[c]["not_run" if cell is None else cell["outcome"]] += 1
            if cell and Outcome(cell["outcome"]).is_failure and clauses[cid]["level"] == MUST:
                summary[c]["must_failures"] += 1
        seen = [(c, row[c]["outcome"]) for c in order if c in row]
        change = next((c for (_, prev), (c, now) in zip(seen, seen[1:]) if now != prev), None)
        if change:
            first_change[cid] = change
    return {"schema": SCHEMA, "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sources": [s for s, _ in docs], "columns": columns, "clauses": clauses, "cells": cells,
            "summary": summary, "first_change": first_change}


def findings(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(clause, column, outcome, message) for every cell whose outcome is a finding, in table order."""
    order = [c["id"] for c in doc["columns"]]
    return [(cid, c, doc["cells"][cid][c]["outcome"], doc["cells"][cid][c]["message"])
            for cid in doc["clauses"] for c in order
            if c in doc["cells"].get(cid, {}) and Outcome(doc["cells"][cid][c]["outcome"]).is_finding]


def _esc(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(doc: dict[str, Any]) -> str:
    cols = doc["columns"]
    order = [c["id"] for c in cols]
    lines = ["# Conformance: implementations side by side", "",
             f"Joined from {', '.join(f'`{s}`' for s in doc['sources'])}. Marks: "
             + ", ".join(f"`{m}` {o.value}" for o, m in MARKS.items()) + f", `{NOT_RUN.text}` not run.", "",
             "| column | environment | device | " + " | ".join(str(o) for o in (*OUTCOMES, "not_run"))
             + " | MUST-fail |",
             "|---|---|---|" + "---:|" * (len(OUTCOMES) + 2)]
    for c in cols:
        s = doc["summary"][c["id"]]
        lines.append(f"| {_esc(c['id'])} | {_esc(c['environment'])} | {c['device']} | "
                     + " | ".join(str(s[o]) for o in (*OUTCOMES, "not_run")) + f" | {s['must_failures']} |")
    lines += ["", "| clause | level | " + " | ".join(_esc(c) for c in order) + " | first change |",
              "|---|---|" + "---|" * (len(order) + 1)]
    for cid, meta in doc["clauses"].items():
        row = doc["cells"].get(cid, {})
        lines.append(f"| {cid} | {meta['level']} | "
                     + " | ".join(mark(row[c]["outcome"] if c in row else None) for c in order)
                     + f" | {_esc(doc['first_change'].get(cid, ''))} |")
    found = findings(doc)
    lines += ["", f"## Findings ({len(found)})", ""]
    for cid, col, outcome, msg in found:
        lines.append(f"- **{cid}** [{col}] {outcome}: {_esc(msg) or '(no message)'}")
    return "\n".join(lines) + "\n"
