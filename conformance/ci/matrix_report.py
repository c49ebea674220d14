"""Joins ``reports/matrix/<cell.id>/`` directories into one table (JSON and Markdown). Stdlib only.

Columns are the cells found on disk plus the matrix cells without a directory ("not run"); rows are
(implementation, clause) outcomes, marked when they differ between cells, and the clone verdicts. The cells'
conformance reports are read by ``conformance.core.report`` and put side by side by the one joiner of reports
(``conformance.core.join``: the same counts, findings and marks as ``python -m conformance join``).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core import join as _join
from ..core.outcome import OUTCOMES, TEXT_MARKS, text_mark
from ..core.report import Report, ReportError, load_report
from .matrix import CELLS, Cell

#: the marks of ``conformance.core.join`` (``conformance.core.outcome.MARKS``: one definition)
MARKS = TEXT_MARKS

#: the versions a cell's column lists (cell.json "installed", else the report's environment)
VERSIONS = ("torch", "bitsandbytes", "peft", "transformers", "accelerate", "huggingface_hub")
CELL_FILES = ("cell.json", "conformance.json", "clone.json")  # what a full cell writes


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _read_report(path: Path) -> Report | None:
    try:
        return load_report(path) if path.is_file() else None
    except ReportError:
        return None


def load_cell(directory: Path) -> dict[str, Any]:
    """What one cell directory holds, normalised: versions, its conformance report, clone verdict.

    Missing files are reported as missing (a cell that crashed before its probe still shows its
    clause outcomes), never silently dropped."""
    meta = _read_json(directory / "cell.json") or {}
    conf = _read_report(directory / "conformance.json")
    clone = _read_json(directory / "clone.json")
    env = (conf.environment if conf else {}) or (clone or {}).get("environment") or {}
    pk = dict(env.get("packages") or {})
    pk.update({k: v for k, v in (meta.get("installed") or {}).items() if v})
    return {
        "id": meta.get("id") or directory.name,
        "torch": meta.get("torch"), "bnb": meta.get("bnb"),
        "device": meta.get("device") or env.get("device"),
        "status": meta.get("status", "unknown"),
        "installed": {k: pk.get(k) for k in VERSIONS},
        "torch_build": env.get("torch_build"),
        "missing": [f for f in (meta.get("files") or CELL_FILES) if not (directory / f).is_file()],
        "steps": meta.get("steps", {}),
        "report": conf,
        "implementations": {k: v.version for k, v in conf.implementations.items()} if conf else {},
        "clone": _clone(clone),
    }


def _clone(clone: dict[str, Any] | None) -> dict[str, Any] | None:
    if clone is None:
        return None
    v = clone.get("verdict") or {}
    return {"clone_required": v.get("clone_required"), "line": v.get("line"),
            "cases": v.get("cases", len(clone.get("cases", []))),
            "required": len(v.get("required", [])), "both_fail": len(v.get("both_fail", [])),
            "uncloned_outcomes": v.get("uncloned_outcomes", {})}


def join(root: str | Path, cells: Iterable[Cell] | None = None) -> dict[str, Any]:
    """Join every cell directory under ``root`` (reports/matrix/) into one document.

    Columns are the cells found on disk plus the matrix cells that have no directory (shown as
    "not run"), in matrix order; rows are (implementation, clause) and the clone verdict. With
    ``cells`` (e.g. one axis), only those cells: other directories under ``root`` are left out.
    Each cell's summary (per implementation) and failure messages come from the one joiner of reports."""
    root = Path(root)
    found = {p.name: load_cell(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "cell.json").is_file()
             or p.is_dir() and (p / "conformance.json").is_file()} if root.is_dir() else {}
    order = [c.id for c in (CELLS if cells is None else cells)]
    if cells is not None:
        found = {k: v for k, v in found.items() if k in order}
    ids = [i for i in order if i in found] + sorted(i for i in found if i not in order)
    not_run = [i for i in order if i not in found]
    reports = [(i, found[i]["report"]) for i in ids if found[i]["report"] is not None]
    joined = _join.join(reports) if reports else {"columns": [], "clauses": {}, "cells": {}, "summary": {}}
    column = {c["id"]: (c["report"], c["implementation"]) for c in joined["columns"]}
    outcomes: dict[str, dict[str, dict[str, str]]] = {}  # implementation -> clause -> cell -> outcome
    for cid, row in joined["cells"].items():
        for col, cell in row.items():
            where, impl = column[col]
            outcomes.setdefault(impl, {}).setdefault(cid, {})[where] = cell["outcome"]
    summary: dict[str, dict[str, Any]] = {i: {} for i in ids}
    for col, (where, impl) in column.items():
        summary[where][impl] = joined["summary"][col]
    messages: dict[str, dict[str, str]] = {i: {} for i in ids}
    for cid, col, _, msg in _join.findings(joined):
        where, impl = column[col]
        messages[where][f"{impl} {cid}"] = str(msg)[:300]
    impls = sorted(outcomes, key=lambda s: (s != "reference", s))
    clause_ids = sorted({k for o in outcomes.values() for k in o})
    rows = []
    for impl in impls:
        for k in clause_ids:
            row = {"implementation": impl, "clause": k, "level": (joined["clauses"].get(k) or {}).get("level"),
                   "outcomes": {i: outcomes[impl].get(k, {}).get(i) for i in ids}}
            row["varies"] = len({o for o in row["outcomes"].values() if o is not None}) > 1
            rows.append(row)
    return {
        "schema_version": "1",
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cells": {i: {k: v for k, v in found[i].items() if k != "report"} | {"summary": summary[i],
                                                                            "messages": messages[i]} for i in ids},
        "not_run": not_run,
        "rows": rows,
    }


def markdown(doc: dict[str, Any]) -> str:
    """The joined matrix as Markdown: versions, clone verdicts, then clause outcomes by cell."""
    ids = list(doc["cells"])
    if not ids:
        return "# Conformance matrix\n\nNo cell reports found.\n"
    cells = doc["cells"]
    out = ["# Conformance matrix (torch x bitsandbytes x PEFT)", "",
           f"Generated {doc['generated_at']}. Cells: {len(ids)}"
           + (f"; not run here: {', '.join(doc['not_run'])}" if doc.get("not_run") else "") + ".", ""]
    head = "| | " + " | ".join(f"`{i}`" for i in ids) + " |"
    sep = "|---|" + "---|" * len(ids)
    out += ["## Versions", "", head, sep]
    for pkg in VERSIONS:
        out.append(f"| {pkg} | " + " | ".join(str(cells[i]["installed"].get(pkg) or "?") for i in ids) + " |")
    out.append("| torch build | " + " | ".join(str(cells[i].get("torch_build") or "?") for i in ids) + " |")
    out.append("| device | " + " | ".join(str(cells[i].get("device") or "?") for i in ids) + " |")
    out.append("| status | " + " | ".join(str(cells[i].get("status")) + (
        f" (missing {', '.join(cells[i]['missing'])})" if cells[i]["missing"] else "") for i in ids) + " |")
    out += ["", "## Clone probe (is the defensive clone in PEFT's bnb forward still needed?)", "", head, sep]

    def clone_cell(c: dict[str, Any] | None) -> str:
        if not c:
            return "not run"
        req = c.get("clone_required")
        word = "**required**" if req else ("not required" if req is False else "?")
        return f"{word}: {c.get('required', 0)}/{c.get('cases', '?')} cases" + (
            f", {c['both_fail']} fail even cloned" if c.get("both_fail") else "")

    out.append("| verdict | " + " | ".join(clone_cell(cells[i]["clone"]) for i in ids) + " |")
    out += ["", "## Summary", "", head, sep]
    impls = sorted({r["implementation"] for r in doc["rows"]}, key=lambda s: (s != "reference", s))
    for impl in impls:
        vals = []
        for i in ids:
            s = cells[i]["summary"].get(impl)
            fails = sum(s.get(o.value, 0) for o in OUTCOMES if o.is_failure) if s else 0  # Outcome.is_failure
            vals.append("—" if not s else f"{s.get('passed', 0)} pass / {fails} fail ({s.get('must_failures', 0)} "
                        f"MUST) / {s.get('skipped', 0)} skip")
        ver = {cells[i]["implementations"].get(impl) for i in ids} - {None}
        out.append(f"| {impl} ({', '.join(sorted(ver))}) | " + " | ".join(vals) + " |")
    out += ["", "## Clause outcomes", "",
            "Rows whose outcome differs between cells are marked **Δ**; — means the clause was not in that "
            "cell's run (registered later, or the implementation was not loaded).", "",
            "| implementation | clause | level | " + " | ".join(f"`{i}`" for i in ids) + " |",
            "|---|---|---|" + "---|" * len(ids)]
    for r in doc["rows"]:
        out.append(f"| {r['implementation']} | {r['clause']}{' **Δ**' if r['varies'] else ''} | {r['level'] or ''} | "
                   + " | ".join(text_mark(r["outcomes"].get(i)) for i in ids) + " |")
    msgs = [(i, k, m) for i in ids for k, m in sorted(cells[i].get("messages", {}).items())]
    if msgs:
        out += ["", "## Failure messages", ""]
        for i, k, m in msgs:
            out.append(f"- `{i}` {k}: {m.replace('|', '/')}")
    return "\n".join(out) + "\n"
