"""The torch x bitsandbytes version matrix: one table in one place, and the joined report.

``noxfile.py`` parametrizes its ``matrix`` session from :data:`CELLS` (it loads this file by path,
without importing the ``conformance`` package, so this module uses the standard library only: nox
may run under an interpreter without torch). Each cell installs its own venv::

    torch==<cell.torch>  bitsandbytes==<cell.bnb>  peft/transformers/accelerate from COMPANIONS[torch]

runs ``python -m conformance run --impl reference --impl peft`` and the clone probe, and writes
``reports/matrix/<cell.id>/{cell.json, conformance.json, conformance.md, clone.json}``.
``python -m conformance.matrix report`` (nox session ``matrix_report``) joins those directories into
one table: clause outcomes per implementation and clone-probe verdicts, by version.

Two axes:

* **bnb axis** (tag ``bnb-axis``): several bitsandbytes releases with the pinned CPU torch
  (:data:`CPU_TORCH`, the pin in ``constraints/cpu.txt``). Runs on a CPU-only machine: bitsandbytes
  >= 0.48 ships the CPU backend for 4-bit and 8-bit (releases before ~0.45 have none).
* **torch axis** (tag ``torch-axis``): other torch releases, each with the bitsandbytes and the
  PEFT / transformers / accelerate of its time (:data:`COMPANIONS`: old PEFT needs old
  transformers). These are GPU CI cells: PyPI's Linux torch wheels are CUDA builds, so on a machine
  without a CUDA device they skip with a message instead of pulling gigabytes.

Pick one cell with ``nox -s "matrix(torch='2.13.0', bnb='0.48.2')"`` or a group with ``nox -t
bnb-axis`` / ``nox -t torch-axis`` / ``nox -t torch-2.12.0`` / ``nox -t gpu-cell``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The torch of the CPU build pinned in ``constraints/cpu.txt`` (a test checks the two agree).
CPU_TORCH = "2.13.0"


@dataclass(frozen=True)
class Companions:
    """Versions installed next to a torch release: what was current when that torch came out.

    ``bnb`` is the bitsandbytes of that torch's torch-axis cell."""

    peft: str
    transformers: str
    accelerate: str
    bnb: str
    note: str = ""


#: torch release -> its companions. Release dates from PyPI (upload times) so the set is one that
#: users actually had: e.g. torch 2.11.0 (2026-03-23) with PEFT 0.19.1 (2026-04-16) and
#: transformers 5.5.4 (2026-04-13). torch 2.6.0 is the "old stack" cell: PEFT 0.15 (no OFT on
#: bitsandbytes, LoRA keyword signature) needs transformers 4.x.
COMPANIONS: dict[str, Companions] = {
    "2.6.0": Companions(peft="0.15.2", transformers="4.51.3", accelerate="1.6.0", bnb="0.45.5",
                        note="old stack: PEFT 0.15 (no OFT on bnb), transformers 4.x"),
    "2.11.0": Companions(peft="0.19.1", transformers="5.5.4", accelerate="1.13.0", bnb="0.49.2"),
    "2.12.0": Companions(peft="0.19.1", transformers="5.10.4", accelerate="1.14.0", bnb="0.49.2"),
    "2.13.0": Companions(peft="0.21.2", transformers="5.23.0", accelerate="1.15.0", bnb="0.50.2",
                         note="the local CPU build (constraints/cpu.txt)"),
    "2.15.0": Companions(peft="0.21.2", transformers="5.23.0", accelerate="1.15.0", bnb="0.50.2",
                         note="newest torch: the cell that answers 'is the clone still needed?'"),
}

#: bitsandbytes releases of the bnb axis (latest patch of each minor that has the CPU backend).
BNB_AXIS: tuple[str, ...] = ("0.48.2", "0.49.2", "0.50.2")
#: torch releases of the torch axis (each with COMPANIONS[torch].bnb).
TORCH_AXIS: tuple[str, ...] = ("2.6.0", "2.11.0", "2.12.0", "2.13.0", "2.15.0")


@dataclass(frozen=True)
class Cell:
    """One (torch, bitsandbytes) combination; companions come from :data:`COMPANIONS`."""

    torch: str
    bnb: str
    tags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def id(self) -> str:
        """Directory name under reports/matrix/: ``torch2.13.0-bnb0.48.2``."""
        return f"torch{self.torch}-bnb{self.bnb}"

    @property
    def session(self) -> str:
        """The nox session name (what ``nox -s`` takes)."""
        return f"matrix(torch={self.torch!r}, bnb={self.bnb!r})"

    @property
    def needs_gpu(self) -> bool:
        """Any torch but the pinned CPU build is a CUDA wheel from PyPI: a GPU CI cell."""
        return self.torch != CPU_TORCH

    @property
    def companions(self) -> Companions:
        return COMPANIONS[self.torch]

    def pins(self) -> list[str]:
        """pip requirement pins of this cell (torch, bitsandbytes and the companions)."""
        c = self.companions
        return [f"torch=={self.torch}", f"bitsandbytes=={self.bnb}", f"peft=={c.peft}",
                f"transformers=={c.transformers}", f"accelerate=={c.accelerate}"]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session, "torch": self.torch, "bnb": self.bnb,
                "tags": list(self.tags), "needs_gpu": self.needs_gpu, "companions": asdict(self.companions)}


def _build_cells() -> tuple[Cell, ...]:
    tags: dict[tuple[str, str], list[str]] = {}
    for b in BNB_AXIS:
        tags.setdefault((CPU_TORCH, b), []).append("bnb-axis")
    for t in TORCH_AXIS:
        tags.setdefault((t, COMPANIONS[t].bnb), []).append("torch-axis")
    cells = []
    for (t, b), axes in tags.items():
        extra = ["gpu-cell" if t != CPU_TORCH else "cpu-cell", f"torch-{t}", f"bnb-{b}"]
        cells.append(Cell(t, b, tuple(axes + extra)))
    return tuple(sorted(cells, key=lambda c: (_vkey(c.torch), _vkey(c.bnb))))


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))


#: Every cell, sorted by (torch, bnb). The noxfile's ``matrix`` session is parametrized from this.
CELLS: tuple[Cell, ...] = _build_cells()


def cell(torch: str, bnb: str) -> Cell:
    """The cell for (torch, bnb); KeyError if it is not in the matrix."""
    for c in CELLS:
        if c.torch == torch and c.bnb == bnb:
            return c
    raise KeyError(f"no matrix cell torch={torch} bnb={bnb}; cells: {', '.join(c.id for c in CELLS)}")


def versions_table() -> str:
    """The matrix as a Markdown table (cells, tags, pins): for docs and ``python -m conformance.matrix list``."""
    rows = ["| cell | torch | bitsandbytes | peft | transformers | accelerate | runs on | tags |",
            "|---|---|---|---|---|---|---|---|"]
    for c in CELLS:
        k = c.companions
        rows.append(f"| `{c.session}` | {c.torch} | {c.bnb} | {k.peft} | {k.transformers} | {k.accelerate} | "
                    f"{'GPU CI' if c.needs_gpu else 'CPU'} | {', '.join(c.tags)} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------
# joining cell reports

MARKS = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip", "xfailed": "xfail",
         "xpassed": "XPASS"}
CELL_FILES = ("cell.json", "conformance.json", "clone.json")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def load_cell(directory: Path) -> dict[str, Any]:
    """What one cell directory holds, normalised: versions, clause outcomes, clone verdict.

    Missing files are reported as missing (a cell that crashed before its probe still shows its
    clause outcomes), never silently dropped."""
    meta = _read_json(directory / "cell.json") or {}
    conf = _read_json(directory / "conformance.json")
    clone = _read_json(directory / "clone.json")
    env = (conf or {}).get("environment") or (clone or {}).get("environment") or {}
    pk = dict(env.get("packages") or {})
    pk.update({k: v for k, v in (meta.get("installed") or {}).items() if v})
    out: dict[str, Any] = {
        "id": meta.get("id") or directory.name,
        "torch": meta.get("torch"), "bnb": meta.get("bnb"),
        "device": meta.get("device") or env.get("device"),
        "status": meta.get("status", "unknown"),
        "installed": {k: pk.get(k) for k in ("torch", "bitsandbytes", "peft", "transformers", "accelerate")},
        "missing": [f for f in CELL_FILES if not (directory / f).is_file()],
        "steps": meta.get("steps", {}),
        "outcomes": {},  # implementation -> clause -> outcome
        "messages": {},  # "impl clause" -> message (failures only)
        "summary": (conf or {}).get("summary", {}).get("implementations", {}),
        "clauses": (conf or {}).get("clauses", {}),
        "implementations": {k: v.get("version") for k, v in ((conf or {}).get("implementations") or {}).items()},
        "clone": None,
    }
    for r in (conf or {}).get("results", []):
        out["outcomes"].setdefault(r["implementation"], {})[r["clause"]] = r["outcome"]
        if r["outcome"] in ("failed", "error"):
            out["messages"][f"{r['implementation']} {r['clause']}"] = str(r.get("message", ""))[:300]
    if clone is not None:
        v = clone.get("verdict") or {}
        out["clone"] = {"clone_required": v.get("clone_required"), "line": v.get("line"),
                        "cases": v.get("cases", len(clone.get("cases", []))),
                        "required": len(v.get("required", [])), "both_fail": len(v.get("both_fail", [])),
                        "uncloned_outcomes": v.get("uncloned_outcomes", {})}
    return out


def join(root: str | Path, cells: Iterable[Cell] | None = None) -> dict[str, Any]:
    """Join every cell directory under ``root`` (reports/matrix/) into one document.

    Columns are the cells found on disk plus the matrix cells that have no directory (shown as
    "not run"), in matrix order; rows are (implementation, clause) and the clone verdict."""
    root = Path(root)
    found = {p.name: load_cell(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "cell.json").is_file()
             or p.is_dir() and (p / "conformance.json").is_file()} if root.is_dir() else {}
    order = [c.id for c in (CELLS if cells is None else cells)]
    ids = [i for i in order if i in found] + sorted(i for i in found if i not in order)
    not_run = [i for i in order if i not in found]
    impls = sorted({i for c in found.values() for i in c["outcomes"]}, key=lambda s: (s != "reference", s))
    clause_ids = sorted({k for c in found.values() for o in c["outcomes"].values() for k in o})
    levels = {}
    for c in found.values():
        for k, v in c["clauses"].items():
            levels.setdefault(k, v.get("level"))
    rows = []
    for impl in impls:
        for k in clause_ids:
            row = {"implementation": impl, "clause": k, "level": levels.get(k),
                   "outcomes": {i: found[i]["outcomes"].get(impl, {}).get(k) for i in ids}}
            row["varies"] = len({o for o in row["outcomes"].values() if o is not None}) > 1
            rows.append(row)
    return {
        "schema_version": "1",
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cells": {i: {k: v for k, v in found[i].items() if k not in ("outcomes", "clauses")} for i in ids},
        "not_run": not_run,
        "rows": rows,
    }


def _mark(outcome: str | None) -> str:
    return "—" if outcome is None else MARKS.get(outcome, outcome)


def markdown(doc: dict[str, Any]) -> str:
    """The joined matrix as Markdown: versions, clone verdicts, then clause outcomes by cell."""
    ids = list(doc["cells"])
    if not ids:
        return "# Conformance matrix\n\nNo cell reports found.\n"
    cells = doc["cells"]
    out = ["# Conformance matrix (torch x bitsandbytes)", "",
           f"Generated {doc['generated_at']}. Cells: {len(ids)}"
           + (f"; not run here: {', '.join(doc['not_run'])}" if doc.get("not_run") else "") + ".", ""]
    head = "| | " + " | ".join(f"`{i}`" for i in ids) + " |"
    sep = "|---|" + "---|" * len(ids)
    out += ["## Versions", "", head, sep]
    for pkg in ("torch", "bitsandbytes", "peft", "transformers", "accelerate"):
        out.append(f"| {pkg} | " + " | ".join(str(cells[i]["installed"].get(pkg) or "?") for i in ids) + " |")
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
            vals.append("—" if not s else f"{s.get('passed', 0)} pass / {s.get('failed', 0) + s.get('error', 0)} "
                        f"fail ({s.get('must_failures', 0)} MUST) / {s.get('skipped', 0)} skip")
        ver = {cells[i]["implementations"].get(impl) for i in ids} - {None}
        out.append(f"| {impl} ({', '.join(sorted(ver))}) | " + " | ".join(vals) + " |")
    out += ["", "## Clause outcomes", "",
            "Rows whose outcome differs between cells are marked **Δ**; — means the clause was not in that "
            "cell's run (registered later, or the implementation was not loaded).", "",
            "| implementation | clause | level | " + " | ".join(f"`{i}`" for i in ids) + " |",
            "|---|---|---|" + "---|" * len(ids)]
    for r in doc["rows"]:
        out.append(f"| {r['implementation']} | {r['clause']}{' **Δ**' if r['varies'] else ''} | {r['level'] or ''} | "
                   + " | ".join(_mark(r["outcomes"].get(i)) for i in ids) + " |")
    msgs = [(i, k, m) for i in ids for k, m in sorted(cells[i].get("messages", {}).items())]
    if msgs:
        out += ["", "## Failure messages", ""]
        for i, k, m in msgs:
            out.append(f"- `{i}` {k}: {m.replace('|', '/')}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.matrix", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="the cells (Markdown table, or --json)")
    ls.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="join reports/matrix/<cell>/ directories into one table")
    rp.add_argument("--in", dest="root", default="reports/matrix", help="directory of cell directories")
    rp.add_argument("--json", dest="json_out", default=None, help="write the joined JSON here")
    rp.add_argument("--markdown", default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print(json.dumps([c.to_json() for c in CELLS], indent=2) if args.json else versions_table(), end="")
        return 0
    doc = join(args.root)
    if not doc["cells"]:
        print(f"no cell reports under {args.root}: run `nox -t bnb-axis` (or one matrix cell) first", file=sys.stderr)
        return 1
    text = markdown(doc)
    for path, body in ((args.json_out, json.dumps(doc, indent=1) + "\n"), (args.markdown, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(body, encoding="utf-8")
            print(f"wrote {path}", file=sys.stderr)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
