"""`python -m conformance.ci joined`: every stored axis table of the version matrix on one page, from small
synthetic tables (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance.ci import joined as jn
from conformance.ci import matrix as mx
from conformance.ci.__main__ import main as ci_main

pytestmark = pytest.mark.cpu_only

BNB = [c for c in mx.CELLS if "bnb-axis" in c.tags]  # ordered by bitsandbytes, the last one the current stack
TORCH = sorted((c for c in mx.CELLS if "torch-axis" in c.tags and c.cpu_runnable), key=lambda c: mx._vkey(c.torch))
HUB = next(c for c in mx.CELLS if {"bnb-axis", "torch-axis", "peft-axis"} <= set(c.tags))


def _installed(c: mx.Cell, build: str) -> dict[str, str]:
    return {"torch": f"{c.torch}+{build}" if build == "cpu" else c.torch, "bitsandbytes": c.bnb, "peft": c.peft,
            "transformers": c.transformers, "accelerate": c.accelerate}


def _table(path: Path, generated_at: str, cells: dict[str, tuple[mx.Cell, str, int | None]],
           rows: dict[tuple[str, str], dict[str, str | None]]) -> None:
    """A stored axis table as matrix_report writes it: ``cells`` stored id -> (cell, build, clone count)."""
    doc: dict[str, Any] = {"schema_version": "1", "generated_at": generated_at, "not_run": [], "cells": {}, "rows": []}
    for sid, (c, build, req) in cells.items():
        doc["cells"][sid] = {
            "id": sid, "torch": c.torch, "bnb": c.bnb, "device": "cpu", "status": "ok",
            "installed": _installed(c, build),
            "torch_build": f"{c.torch}+{build} (CUDA build, no GPU: ran on CPU)" if build != "cpu" else None,
            "clone": None if req is None else {"clone_required": req > 0, "required": req, "cases": 1566}}
    for (impl, clause), outcomes in rows.items():
        doc["rows"].append({"implementation": impl, "clause": clause, "level": "MUST",
                            "outcomes": {sid: outcomes.get(sid) for sid in cells}})
    path.write_text(json.dumps(doc))


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """An old bnb-axis table under old ids (torch<T>-bnb<B>), a newer torch-axis table under the current ids that
    holds the current stack too (with another outcome for one clause), and a file that is no axis table."""
    b0, b1, b2 = BNB
    old = {f"torch{c.torch}-bnb{c.bnb}": (c, "cpu", req) for c, req in ((b0, 276), (b1, 306), (b2, 204))}
    ids = list(old)
    _table(tmp_path / "cpu-bnb-axis-torch2.13.0.json", "2026-11-23T00:00:00+00:00", old, {
        ("reference", "FWD-A"): {ids[0]: "passed", ids[1]: "passed", ids[2]: "passed"},
        ("peft", "MERGE-B"): {ids[0]: "failed", ids[1]: None, ids[2]: "passed"},  # b1 ran without the clause
        ("peft", "OLD-C"): {ids[0]: "passed", ids[1]: "failed", ids[2]: "error"},
    })
    t_before, t_after = TORCH[TORCH.index(HUB) - 1], TORCH[TORCH.index(HUB) + 1]
    new = {t_before.id: (t_before, "cu130", 306), HUB.id: (HUB, "cpu", 204), t_after.id: (t_after, "cu132", 0)}
    _table(tmp_path / "cpu-torch-axis.json", "2026-12-01T00:00:00+00:00", new, {
        ("reference", "FWD-A"): {t_before.id: "passed", HUB.id: "passed", t_after.id: "failed"},
        ("peft", "OLD-C"): {t_before.id: "passed", HUB.id: "passed", t_after.id: "passed"},
    })
    (tmp_path / "notes.json").write_text(json.dumps({"something": "else"}))
    return tmp_path


def test_cells_are_named_by_what_was_installed(stored: Path) -> None:
    doc = jn.join(stored)
    b0, b1, b2 = BNB
    assert b0.id in doc["cells"] and b1.id in doc["cells"], "old ids become the current matrix ids"
    assert f"torch{b0.torch}-bnb{b0.bnb}" not in doc["cells"]
    hub = doc["cells"][HUB.id]
    assert [s["file"] for s in hub["sources"]] == ["cpu-bnb-axis-torch2.13.0.json", "cpu-torch-axis.json"]
    assert set(hub["axes"]) >= {"bnb-axis", "torch-axis"}
    assert doc["axes"]["bnb-axis"] == [b0.id, b1.id, b2.id]
    assert doc["axes"]["torch-axis"][1] == HUB.id and len(doc["axes"]["torch-axis"]) == 3
    assert doc["cells"][doc["axes"]["torch-axis"][2]]["pins"]["build"] == "cu132"
    assert [t["file"] for t in doc["tables"]] == ["cpu-bnb-axis-torch2.13.0.json", "cpu-torch-axis.json"]


def test_first_change_per_axis_names_what_changed(stored: Path) -> None:
    doc = jn.join(stored)
    rows = {(r["implementation"], r["clause"]): r for r in doc["rows"]}
    b0, b1, b2 = BNB
    # FWD-A: nothing changes on the bnb axis; on the torch axis it fails after the current stack, torch changed
    fwd = rows[("reference", "FWD-A")]
    assert "bnb-axis" not in fwd["changes"]
    first = fwd["first_change"]["torch-axis"]
    t_after = doc["axes"]["torch-axis"][2]
    assert (first["previous"], first["cell"], first["outcome"]) == (HUB.id, t_after, ["passed", "failed"])
    assert first["changed"]["torch"] == [HUB.torch, doc["cells"][t_after]["pins"]["torch"]]
    assert first["changed"]["build"] == ["cpu", "cu132"] and "bitsandbytes" not in first["changed"]
    assert first["tables"] == [], "both outcomes come from the same stored table"
    # MERGE-B: b1 has no outcome and is passed over; the change is b0 -> b2, bitsandbytes changed
    merge = rows[("peft", "MERGE-B")]["changes"]["bnb-axis"]
    assert len(merge) == 1 and merge[0]["previous"] == b0.id and merge[0]["cell"] == b2.id
    assert merge[0]["passed_over"] == [b1.id] and merge[0]["changed"] == {"bitsandbytes": [b0.bnb, b2.bnb]}
    # the clone verdict is a row too
    clone = rows[jn.CLONE_ROW]
    assert [c["outcome"] for c in clone["changes"]["bnb-axis"]] == [
        ["required 276/1566", "required 306/1566"], ["required 306/1566", "required 204/1566"]]
    assert clone["first_change"]["torch-axis"]["outcome"] == ["required 306/1566", "required 204/1566"]


def test_the_newest_table_wins_and_a_disagreement_is_listed(stored: Path) -> None:
    doc = jn.join(stored)
    rows = {(r["implementation"], r["clause"]): r for r in doc["rows"]}
    old_c = rows[("peft", "OLD-C")]
    assert old_c["outcomes"][HUB.id] == "passed" and old_c["from"][HUB.id] == "cpu-torch-axis.json"
    assert doc["conflicts"] == [{"implementation": "peft", "clause": "OLD-C", "cell": HUB.id,
                                 "older": {"file": "cpu-bnb-axis-torch2.13.0.json", "outcome": "error"},
                                 "newer": {"file": "cpu-torch-axis.json", "outcome": "passed"}}]
    # the newer outcome sits beside older bnb-axis runs: the change there names both tables
    b0, b1, b2 = BNB
    changes = old_c["changes"]["bnb-axis"]
    assert [(c["cell"], c["outcome"]) for c in changes] == [(b1.id, ["passed", "failed"]), (b2.id, ["failed", "passed"])]
    assert changes[0]["tables"] == [] and changes[1]["tables"] == ["cpu-bnb-axis-torch2.13.0.json", "cpu-torch-axis.json"]
    assert "torch-axis" not in old_c["changes"]


def test_markdown_shows_where_and_why(stored: Path) -> None:
    md = jn.markdown(jn.join(stored))
    b0, b2 = BNB[0], BNB[2]
    lbl = {c.id: f"t{c.torch}/b{c.bnb}/p{c.peft}" for c in (b0, b2)}
    assert (f"| peft | MERGE-B | bnb-axis | {lbl[b0.id]} → **{lbl[b2.id]}** | FAIL → pass | "
            f"bitsandbytes {b0.bnb}→{b2.bnb} | t{BNB[1].torch}/b{BNB[1].bnb}/p{BNB[1].peft} |") in md
    assert "| peft | OLD-C | " in md and "## Stored tables that disagree" in md
    assert "required 276/1566 → required 306/1566" in md
    assert "[`cpu-torch-axis`](cpu-torch-axis.md)" in md


def test_write_check_and_the_command(stored: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ci_main(["joined", "--dir", str(stored), "--check"]) == 1
    assert "run `python -m conformance.ci joined`" in capsys.readouterr().err
    assert ci_main(["joined", "--dir", str(stored)]) == 0
    assert (stored / "joined.md").read_text().startswith("# The version matrix, every axis joined")
    assert ci_main(["joined", "--dir", str(stored), "--check"]) == 0
    assert jn.join(stored)["tables"] == json.loads((stored / "joined.json").read_text())["tables"], \
        "joined.json is not read back as an axis table"
    (stored / "joined.md").write_text("stale\n")
    assert jn.write(stored, check=True) == [stored / "joined.md"]


def test_an_unreadable_table_is_named(tmp_path: Path) -> None:
    (tmp_path / "cpu-bnb-axis-x.json").write_text("{not json")
    with pytest.raises(ValueError, match="cpu-bnb-axis-x.json"):
        jn.join(tmp_path)
    assert jn.markdown(jn.join(tmp_path / "empty")).endswith("No stored axis tables.\n")


def test_the_stored_joined_table_is_current() -> None:
    """baselines/matrix/joined.{json,md} is what the stored axis tables give."""
    assert ci_main(["joined", "--check"]) == 0, "run `python -m conformance.ci joined`"

