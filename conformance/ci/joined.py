"""Every stored axis of the version matrix on one page: ``baselines/matrix/*.json`` joined. Stdlib only.

Each stored axis table (what ``python -m conformance.ci matrix_report --save NAME`` writes) holds its cells under
the cell ids of the day it ran; the same environment may appear in several of them under different ids (the
current stack is on all three axes). Here a cell is named by what was installed in it, not by its stored id: a
stored cell whose torch, bitsandbytes, PEFT, transformers and accelerate are those of a cell of
:data:`conformance.ci.matrix.CELLS` gets that cell's current id and axes, and the stored tables that hold the same
environment become one column (per row, the newest stored table that has an outcome for it; a disagreement between
stored tables is listed, never hidden).

Along each axis (its cells ordered by the axis' own version: bitsandbytes, torch, PEFT), each row (an
implementation's clause, and the clone-probe verdict) gets every neighbouring pair of cells whose outcome differs,
the first of them per axis, and what differs between those two environments: the pins (torch, its build,
bitsandbytes, PEFT, transformers, accelerate, huggingface_hub, device), so a change is attributed to the axis that
changed there. Cells without an outcome for a row (the clause was registered after that run) are passed over and
named.

``python -m conformance.ci joined`` writes ``baselines/matrix/joined.{json,md}``; ``--check`` exits 1 when they
are not what the stored tables give (the output carries no clock time, so it is reproducible).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.outcome import text_mark
from .matrix import CELLS, ROOT, Cell

DIRECTORY = ROOT / "baselines" / "matrix"
OUTPUT = "joined"
#: axis tag -> the pin its cells are ordered by
AXES: dict[str, str] = {"bnb-axis": "bitsandbytes", "torch-axis": "torch", "peft-axis": "peft"}
#: what names an environment, in the order a difference is told
PINS = ("torch", "build", "bitsandbytes", "peft", "transformers", "accelerate", "huggingface_hub", "device")
#: the row of the clone-probe verdict (not a clause: its value is the verdict with its count)
CLONE_ROW = ("clone probe", "clone required")
SCHEMA_VERSION = "1"


def _vkey(v: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v or "").split("+")[0].split(".") if p.isdigit())


def _public(v: str | None) -> str | None:
    return v.split("+")[0] if v else v


def _build(installed_torch: str | None, torch_build: str | None) -> str | None:
    """The torch build: the local version label (``cpu``, ``cu130``) of the installed torch or of the build label
    (``2.12.0+cu130 (CUDA build, no GPU: ran on CPU)``); None when neither records it."""
    for text in (installed_torch, (torch_build or "").split(" ")[0]):
        if text and "+" in text:
            return text.split("+", 1)[1]
    if torch_build and "CPU build" in torch_build:
        return "cpu"
    return None


@dataclass
class JoinedCell:
    """One environment: its pins, the axes it is on, the stored tables it comes from."""

    key: str
    pins: dict[str, str | None]
    axes: tuple[str, ...]
    torch_build: str | None
    sources: list[dict[str, str]] = field(default_factory=list)

    def label(self) -> str:
        p = self.pins
        return f"t{p['torch']}/b{p['bitsandbytes']}/p{p['peft']}"


def _match(pins: dict[str, str | None], cells: tuple[Cell, ...]) -> Cell | None:
    for c in cells:
        if (c.torch, c.bnb, c.peft, c.transformers, c.accelerate) == (
                pins["torch"], pins["bitsandbytes"], pins["peft"], pins["transformers"], pins["accelerate"]):
            return c
    return None


def _file_axis(path: Path) -> tuple[str, ...]:
    return tuple(a for a in AXES if re.search(rf"(^|-){a}(-|$)", path.stem))


def _clone_value(clone: dict[str, Any] | None) -> str | None:
    if not clone or clone.get("clone_required") is None:
        return None
    word = "required" if clone["clone_required"] else "not required"
    return f"{word} {clone.get('required', 0)}/{clone.get('cases', '?')}"


def read_tables(directory: Path = DIRECTORY) -> list[tuple[Path, dict[str, Any]]]:
    """The stored axis tables under ``directory``: JSONs with ``cells`` and ``rows`` (the output of this module and
    other JSONs are left out), oldest first by their ``generated_at``."""
    out = []
    for p in sorted(directory.glob("*.json")):
        if p.stem == OUTPUT:
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{p}: not readable JSON ({exc}); remove it or store it again") from None
        if isinstance(doc, dict) and isinstance(doc.get("cells"), dict) and isinstance(doc.get("rows"), list):
            out.append((p, doc))
    return sorted(out, key=lambda t: (str(t[1].get("generated_at") or ""), t[0].name))


def join(directory: Path = DIRECTORY, cells: tuple[Cell, ...] = CELLS) -> dict[str, Any]:
    """Join every stored axis table under ``directory`` into one document (see the module docstring)."""
    tables = read_tables(directory)
    joined: dict[str, JoinedCell] = {}
    values: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}  # row -> key -> (outcome, source file)
    levels: dict[tuple[str, str], str | None] = {}
    conflicts: list[dict[str, Any]] = []
    for path, doc in tables:  # oldest first: a newer table's outcome replaces an older one's
        for sid, c in doc["cells"].items():
            inst = c.get("installed") or {}
            pins = {"torch": _public(inst.get("torch") or c.get("torch")), "build": _build(inst.get("torch"),
                                                                                          c.get("torch_build")),
                    "bitsandbytes": inst.get("bitsandbytes") or c.get("bnb"), "peft": inst.get("peft"),
                    "transformers": inst.get("transformers"), "accelerate": inst.get("accelerate"),
                    "huggingface_hub": inst.get("huggingface_hub"), "device": c.get("device")}
            m = _match(pins, cells)
            key = m.id if m else sid
            axes = tuple(a for a in AXES if (m and a in m.tags) or a in _file_axis(path))
            jc = joined.get(key)
            if jc is None:
                jc = joined[key] = JoinedCell(key, pins, axes, c.get("torch_build"))
            else:
                jc.pins.update({k: v for k, v in pins.items() if v is not None})
                jc.axes = tuple(a for a in AXES if a in jc.axes or a in axes)
                jc.torch_build = c.get("torch_build") or jc.torch_build
            jc.sources.append({"file": path.name, "id": sid, "generated_at": str(doc.get("generated_at") or "")})
            found = [((r["implementation"], r["clause"]), r.get("level"), (r.get("outcomes") or {}).get(sid))
                     for r in doc["rows"]]
            found.append((CLONE_ROW, None, _clone_value(c.get("clone"))))
            for row, level, value in found:
                if value is None:
                    continue
                levels[row] = levels.get(row) or level
                old = values.setdefault(row, {}).get(key)
                if old is not None and old[0] != value:
                    conflicts.append({"implementation": row[0], "clause": row[1], "cell": key,
                                      "older": {"file": old[1], "outcome": old[0]},
                                      "newer": {"file": path.name, "outcome": value}})
                values[row][key] = (value, path.name)
    order = sorted(joined.values(), key=lambda j: (_vkey(j.pins["torch"]), _vkey(j.pins["bitsandbytes"]),
                                                    _vkey(j.pins["peft"]), j.key))
    axes = {a: [j.key for j in sorted((j for j in order if a in j.axes), key=lambda j: _vkey(j.pins[pin]))]
            for a, pin in AXES.items()}
    rows = []
    for row in sorted(values, key=lambda r: (r == CLONE_ROW, r[0] != "reference", r)):
        outcomes = {j.key: values[row].get(j.key, (None, ""))[0] for j in order}
        source = {k: v[1] for k, v in values[row].items()}
        changes = {a: _changes(outcomes, axes[a], joined, source) for a in AXES}
        rows.append({"implementation": row[0], "clause": row[1], "level": levels.get(row), "outcomes": outcomes,
                     "from": source,
                     "changes": {a: ch for a, ch in changes.items() if ch},
                     "first_change": {a: ch[0] for a, ch in changes.items() if ch}})
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "python -m conformance.ci joined",
        "tables": [{"file": p.name, "generated_at": str(d.get("generated_at") or ""), "cells": list(d["cells"])}
                   for p, d in tables],
        "cells": {j.key: {"label": j.label(), "pins": j.pins, "torch_build": j.torch_build, "axes": list(j.axes),
                          "sources": j.sources} for j in order},
        "axes": axes,
        "rows": rows,
        "conflicts": conflicts,
    }


def _changes(outcomes: dict[str, str | None], along: list[str], cells: dict[str, JoinedCell],
             tables: dict[str, str]) -> list[dict]:
    """Every neighbouring pair along one axis whose outcomes differ (cells without an outcome passed over). When the
    two outcomes come from different stored tables, ``tables`` names both: the suite may have changed between the
    two runs as well as the pins."""
    out = []
    prev: str | None = None
    passed: list[str] = []
    for key in along:
        if outcomes.get(key) is None:
            if prev is not None:
                passed.append(key)
            continue
        if prev is not None and outcomes[prev] != outcomes[key]:
            a, b = cells[prev].pins, cells[key].pins
            out.append({"cell": key, "previous": prev, "outcome": [outcomes[prev], outcomes[key]],
                        "changed": {p: [a[p], b[p]] for p in PINS if a[p] and b[p] and a[p] != b[p]},
                        "passed_over": list(passed),
                        "tables": [tables[prev], tables[key]] if tables[prev] != tables[key] else []})
        prev, passed = key, []
    return out


def _mark(row: dict[str, Any], value: str | None) -> str:
    """An outcome's mark; the clone row's verdict as it is."""
    clone = (row["implementation"], row["clause"]) == CLONE_ROW
    return value if clone and value is not None else text_mark(value)


def _what(change: dict[str, Any]) -> str:
    pins = ", ".join(f"{p} {a}→{b}" for p, (a, b) in change["changed"].items()) or "no recorded pin differs"
    return pins + (" (and the run: `{}` → `{}`)".format(*change["tables"]) if change["tables"] else "")


def markdown(doc: dict[str, Any]) -> str:
    """The joined document as Markdown: cells, axes, where outcomes change (first per axis), every row."""
    cells = doc["cells"]
    if not cells:
        return "# The version matrix, every axis joined\n\nNo stored axis tables.\n"
    label = {k: c["label"] for k, c in cells.items()}
    out = ["# The version matrix, every axis joined", "",
           f"Generated by `{doc['command']}` from the stored axis tables "
           + ", ".join(f"[`{t['file'][:-5]}`]({t['file'][:-5]}.md) ({t['generated_at'] or 'undated'})"
                       for t in doc["tables"])
           + ". A cell is named by what was installed in it (its current matrix id where the matrix has those pins);"
             " a cell stored in several tables is one column, each row from the newest table that has it.", "",
           "## Cells", "",
           "| cell | id | axes | torch (build) | bitsandbytes | peft | transformers | accelerate | hub | device | "
           "stored in |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in cells.items():
        p = c["pins"]
        src = "; ".join(f"`{s['file']}` as `{s['id']}`" for s in c["sources"])
        out.append(f"| {c['label']} | `{k}` | {', '.join(c['axes']) or '—'} | {p['torch']} ({p['build'] or '?'}) | "
                   f"{p['bitsandbytes']} | {p['peft']} | {p['transformers']} | {p['accelerate']} | "
                   f"{p['huggingface_hub'] or '?'} | {p['device'] or '?'} | {src} |")
    out += ["", "## Axes", ""]
    for a, keys in doc["axes"].items():
        out.append(f"- **{a}** (ordered by {AXES[a]}): " + (" → ".join(label[k] for k in keys) or "no stored cell"))
    changed = [r for r in doc["rows"] if r["changes"]]
    out += ["", "## Where an outcome changes", "",
            f"{len(changed)} of {len(doc['rows'])} rows change along some axis. For each, every change along each "
            "axis: the cell where it changes, the cell before it on that axis, and what differs between the two "
            "environments (the first change per axis is listed first); where the two outcomes come from different "
            "stored tables, the run differs too (the suite of another day), so the pins alone may not explain it.",
            "",
            "| implementation | clause | axis | from → at | outcome | what changed | passed over (no outcome) |",
            "|---|---|---|---|---|---|---|"]
    for r in changed:
        for a, chs in r["changes"].items():
            for ch in chs:
                out.append(f"| {r['implementation']} | {r['clause']} | {a} | {label[ch['previous']]} → "
                           f"**{label[ch['cell']]}** | {_mark(r, ch['outcome'][0])} → {_mark(r, ch['outcome'][1])} | "
                           f"{_what(ch)} | {', '.join(label[k] for k in ch['passed_over']) or ''} |")
    if doc["conflicts"]:
        out += ["", "## Stored tables that disagree", "", "| implementation | clause | cell | older | newer |",
                "|---|---|---|---|---|"]
        for c in doc["conflicts"]:
            out.append(f"| {c['implementation']} | {c['clause']} | {label[c['cell']]} | {c['older']['outcome']} "
                       f"(`{c['older']['file']}`) | {c['newer']['outcome']} (`{c['newer']['file']}`) |")
    keys = list(cells)
    out += ["", "## Every row", "",
            "— : no outcome in that cell (the clause was registered after its run, or the implementation was not "
            "run there). First change: per axis, the cell where the outcome first changes.", "",
            "| implementation | clause | level | " + " | ".join(label[k] for k in keys) + " | first change |",
            "|---|---|---|" + "---|" * len(keys) + "---|"]
    for r in doc["rows"]:
        first = "; ".join(f"{a}: {label[ch['cell']]} ({_what(ch)})" for a, ch in r["first_change"].items())
        out.append(f"| {r['implementation']} | {r['clause']}{' **Δ**' if r['changes'] else ''} | {r['level'] or ''} "
                   "| " + " | ".join(_mark(r, r["outcomes"][k]) for k in keys) + f" | {first} |")
    return "\n".join(out) + "\n"


def write(directory: Path = DIRECTORY, check: bool = False) -> list[Path]:
    """Write ``joined.{json,md}`` in ``directory`` (``check``: write nothing); the paths that were (``check``:
    would be) changed."""
    doc = join(directory)
    texts = {directory / f"{OUTPUT}.json": json.dumps(doc, indent=1) + "\n", directory / f"{OUTPUT}.md": markdown(doc)}
    stale = [p for p, t in texts.items() if not p.is_file() or p.read_text(encoding="utf-8") != t]
    if not check:
        for p in stale:
            p.write_text(texts[p], encoding="utf-8")
    return stale
