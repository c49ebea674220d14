"""``python -m conformance join``: reports side by side (``conformance.core.join``), torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.core import join

pytestmark = pytest.mark.cpu_only

CLAUSES = {"A-ONE": "MUST", "B-TWO": "MUST", "C-THREE": "SHOULD"}


def _doc(impls: dict[str, tuple[str, dict[str, str]]], env: dict[str, str] | None = None,
         python: dict[str, str] | None = None) -> dict:
    """A report: impls = name -> (version, clause -> outcome[:message])."""
    results = []
    for name, (_, outcomes) in impls.items():
        for cid, spec in outcomes.items():
            outcome, _, msg = spec.partition(":")
            results.append({"clause": cid, "implementation": name, "outcome": outcome, "message": msg,
                            "level": CLAUSES[cid], "device": "cpu", "measurements": {}, "duration_s": 0.1})
    implementations = {n: {"version": v, "capabilities": []} for n, (v, _) in impls.items()}
    for n, path in (python or {}).items():
        implementations[n].update(python=path, packages={"torch": "2.13.0", "litgpt": "0.5.13"})
    return {"schema_version": "1", "environment": {"device": "cpu", "python": "3.11",
                                                   "packages": env or {"torch": "2.13.0", "peft": "0.21.2"}},
            "implementations": implementations,
            "clauses": {c: {"level": lv, "text": c.lower(), "source": "s", "area": "x"} for c, lv in CLAUSES.items()},
            "results": results, "summary": {}}


def test_columns_cells_counts_and_findings() -> None:
    a = _doc({"reference": ("0.1.0", {"A-ONE": "passed", "B-TWO": "passed", "C-THREE": "passed"}),
              "peft": ("0.21.2", {"A-ONE": "passed", "B-TWO": "failed:peft broke B", "C-THREE": "skipped:no oft"})})
    b = _doc({"litgpt": ("0.5.13", {"A-ONE": "error:litgpt crashed", "B-TWO": "inconclusive:too few"})},
             python={"litgpt": "/envs/litgpt/bin/python"})
    doc = join.join([("a.json", a), ("b.json", b)])
    assert [c["id"] for c in doc["columns"]] == ["reference@0.1.0", "peft@0.21.2", "litgpt@0.5.13"]
    lit = doc["columns"][2]
    assert lit["python"] == "/envs/litgpt/bin/python" and "litgpt 0.5.13" in lit["environment"]
    assert "peft" not in lit["environment"]  # its own interpreter's packages, not the report's
    assert doc["cells"]["B-TWO"]["peft@0.21.2"] == {"outcome": "failed", "message": "peft broke B"}
    assert "litgpt@0.5.13" not in doc["cells"]["C-THREE"]
    assert doc["summary"]["litgpt@0.5.13"] | {} == {**{o: 0 for o in join.OUTCOMES}, "error": 1, "inconclusive": 1,
                                                    "not_run": 1, "must_failures": 2}
    assert doc["summary"]["peft@0.21.2"]["must_failures"] == 1  # C-THREE is SHOULD and skipped anyway
    assert join.findings(doc) == [("A-ONE", "litgpt@0.5.13", "error", "litgpt crashed"),
                                  ("B-TWO", "peft@0.21.2", "failed", "peft broke B"),
                                  ("B-TWO", "litgpt@0.5.13", "inconclusive", "too few")]
    md = join.markdown(doc)
    assert "| B-TWO | MUST | pass | FAIL | INCONCL |" in md
    assert "| C-THREE | SHOULD | pass | skip | — |" in md
    assert "- **B-TWO** [peft@0.21.2] failed: peft broke B" in md
    assert "## Findings (3)" in md


def test_first_change_along_the_given_order() -> None:
    releases = [("0.16.0", "failed"), ("0.17.1", "failed"), ("0.18.1", "passed"), ("0.19.1", "passed")]
    docs = [(f"{v}.json", _doc({"peft": (v, {"A-ONE": o, "B-TWO": "passed"})}, env={"peft": v}))
            for v, o in releases]
    doc = join.join(docs)
    assert doc["first_change"] == {"A-ONE": "peft@0.18.1"}
    assert "| A-ONE | MUST | FAIL | FAIL | pass | pass | peft@0.18.1 |" in join.markdown(doc)


def test_same_implementation_and_version_in_two_environments_get_two_columns() -> None:
    one = _doc({"peft": ("0.21.2", {"A-ONE": "passed"})}, env={"torch": "2.13.0", "transformers": "5.23.0"})
    two = _doc({"peft": ("0.21.2", {"A-ONE": "failed:x"})}, env={"torch": "2.12.0", "transformers": "5.23.0"})
    ids = [c["id"] for c in join.join([("one.json", one), ("two.json", two)])["columns"]]
    assert ids[0] == "peft@0.21.2" and ids[1].startswith("peft@0.21.2 (torch 2.12.0") and len(set(ids)) == 2
    ids = [c["id"] for c in join.join([("one.json", one)] * 3)["columns"]]
    assert len(set(ids)) == 3  # the same report given three times: three columns, told apart


@pytest.mark.parametrize("bad, words", [
    ({"implementation": "ghost"}, "names no listed implementation"),
    ({"outcome": "weird"}, "outcome 'weird'"),
])
def test_a_result_that_fits_no_column_is_an_error(bad: dict, words: str) -> None:
    doc = _doc({"peft": ("1", {"A-ONE": "passed"})})
    doc["results"][0].update(bad)
    with pytest.raises(join.JoinError, match=words):
        join.join([("r.json", doc)])
    with pytest.raises(join.JoinError, match="at least one"):
        join.join([])


@pytest.mark.e2e
def test_cli_join_writes_json_and_markdown(tmp_path: Path) -> None:
    paths = []
    for name, outcome in (("ref", "passed"), ("peft", "failed:broken")):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(_doc({name: ("1.0", {"A-ONE": outcome})})))
        paths.append(str(p))
    out_json, out_md = tmp_path / "out" / "j.json", tmp_path / "out" / "j.md"
    proc = subprocess.run([sys.executable, "-m", "conformance", "join", *paths, "--json", str(out_json),
                           "--markdown", str(out_md)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 findings" in proc.stdout
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == join.SCHEMA and doc["sources"] == paths
    assert doc["cells"]["A-ONE"]["peft@1.0"]["outcome"] == "failed"
    assert "| A-ONE | MUST | pass | FAIL |" in out_md.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "conformance", "join", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "not a conformance report" in proc.stderr and "Traceback" not in proc.stderr


def test_the_matrix_report_uses_the_same_marks() -> None:
    from conformance.ci import matrix_report

    assert matrix_report.MARKS == join.MARKS
