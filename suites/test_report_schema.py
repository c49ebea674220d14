"""The report's typed records (``conformance.core.report``): schema "2" round-trips, schema "1" (every report stored
in ``baselines/``) still loads into the same fields, and the readers (``compare``, ``markdown``, ``join``, the
matrix report) take either. Torch-free."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.core import join
from conformance.core import report as cr
from conformance.core.outcome import MARKS, NOT_RUN, OUTCOMES, TEXT_MARKS, Outcome
from conformance.harness import report

ROOT = Path(__file__).resolve().parents[1]
#: folders of ``baselines/`` that hold conformance reports (beside step logs named ``nox-*``)
REPORT_FOLDERS = ("baselines/conformance", "baselines/regress")


def _stored_json() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "baselines"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every JSON file on disk
        return sorted((ROOT / "baselines").rglob("*.json"))
    return [ROOT / p for p in out.stdout.split() if p.endswith(".json")]


def _not_a_report_by_design(path: Path) -> bool:
    """JSON in a report folder that is not a report by design: step logs (``nox-*``, a session's ``steps.json``) and
    what a standalone reproducer writes (``reproducers/``)."""
    return path.name.startswith("nox-") or path.name == "steps.json" or "reproducers" in path.relative_to(ROOT).parts


def test_every_stored_report_loads() -> None:
    """Every conformance report in ``baselines/`` (a JSON object with ``schema_version`` and a ``results`` list:
    ``cr.is_report``) loads through ``cr.Report.from_json``; the other stored JSON (clone probe, benchmarks, matrix
    joins, step logs) is not one, and nothing under the report folders is skipped by that rule."""
    loaded, others = [], []
    for path in _stored_json():
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not cr.is_report(doc):
            others.append(path)
            continue
        rep = cr.load_report(path)
        loaded.append(path)
        assert len(rep.results) == len(doc["results"]) > 0, path
        assert rep.schema_version in ("1", "2")
        for r in rep.results:  # schema "1"'s keys moved to their fields; measurements are numbers only
            assert all(cr.is_number(v) for v in r.measurements.values()), (path, r.clause, r.measurements)
            assert not {"notes", "families", "cases_skipped", "reproducer", "reproducers"} & r.details.keys()
        assert cr.Report.from_json(json.loads(json.dumps(rep.to_json()))) == dataclasses.replace(
            rep, schema_version=cr.SCHEMA_VERSION), path
    assert len(loaded) > 0
    skipped_in_report_folders = [p for p in others if str(p.relative_to(ROOT).parent).startswith(REPORT_FOLDERS)
                                 and not _not_a_report_by_design(p)]
    assert not skipped_in_report_folders, f"not read as reports: {skipped_in_report_folders}"


def _v2() -> cr.Report:
    res = [
        cr.Result("MERGE-ROUNDTRIP", "ref", Outcome.FAILED, "merged forward off", 1.25,
               {"worst_ratio": 2.5, "cases": 12}, "MUST", "cpu",
               families={"lora/4bit": cr.Family(Outcome.FAILED, 6, 2, {"rslora not declared": 2}, "off"),
                         "oft/8bit": cr.Family(Outcome.PASSED, 4, 0)},
               notes=["a note"], cases_skipped={"rslora": 2}, reproducers=["/tmp/r/a.py", "/tmp/r/b.py"],
               details={"violations": ["lora/4bit merge"], "rejected_ways": {"x": ["y"]}}),
        cr.Result("FWD-ORACLE", "ref", Outcome.SKIPPED, "ref does not declare capability cuda", level="SHOULD"),
    ]
    return cr.Report(results=res,
                  implementations={"ref": cr.ImplementationInfo("1.0", ["lora"], {"oft": "no"}, "/envs/py",
                                                             {"torch": "2.13.0"})},
                  clauses={"MERGE-ROUNDTRIP": cr.ClauseInfo("MUST", "t", "s", "merge"),
                           "FWD-ORACLE": cr.ClauseInfo("SHOULD", "t", "s", "forward")},
                  environment={"device": "cpu", "packages": {"torch": "2.13.0"}}, summary=report.summarize(res),
                  generated_at="2026-01-01T00:00:00+00:00", command="conformance run",
                  not_run=[{"clause": "X-Y", "implementation": "ref"}])


def test_v2_round_trips() -> None:
    rep = _v2()
    doc = json.loads(json.dumps(rep.to_json()))
    assert doc["schema_version"] == cr.SCHEMA_VERSION == "2"
    assert doc["results"][0]["measurements"] == {"worst_ratio": 2.5, "cases": 12}
    assert doc["results"][0]["families"]["lora/4bit"] == {"outcome": "failed", "run": 6, "skipped": 2,
                                                          "skip_reasons": {"rslora not declared": 2}, "message": "off"}
    assert cr.Report.from_json(doc) == rep
    assert cr.Result.from_json({"event": "result", **rep.results[0].to_json()}) == rep.results[0]  # a worker's event


#: a result as schema "1" wrote it: notes, family texts, skipped cases and reproducers inside measurements
V1_RESULT = {"clause": "STATE-OUTPUT-MATCHES-MODEL", "implementation": "peft", "outcome": "failed",
             "message": "2 distinct violation(s)", "duration_s": 3.5, "level": "MUST", "device": "cpu",
             "measurements": {"examples": 40, "worst_ratio": 1.5, "exploring": True, "steps_per_op": {"merge": 3},
                              "reproducer": "/r/repro_1.py", "violations": ["lora/4bit merge"],
                              "reproducers": ["/r/repro_1.py", "/r/repro_2.py"],
                              "cases_skipped": {"input_cast": 6},
                              "families": {"lora/4bit": "failed: merged off", "lora/8bit": "passed"},
                              "notes": ["shrinking was cut"]}}


def _v1_doc() -> dict:
    return {"schema_version": "1", "generated_at": "2025-01-01T00:00:00+00:00", "command": "",
            "environment": {"device": "cpu", "packages": {"torch": "2.13.0", "peft": "0.21.2"}},
            "implementations": {"peft": {"version": "0.21.2", "capabilities": ["lora", "4bit"], "unsupported": {}}},
            "clauses": {"STATE-OUTPUT-MATCHES-MODEL": {"level": "MUST", "text": "t", "source": "s", "area": "a"}},
            "results": [V1_RESULT],
            "summary": {"implementations": {"peft": {"passed": 0, "failed": 1, "must_failures": 1, "total": 1}},
                        "exit_status": 1}}


def test_v1_reads_into_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(_v1_doc()))
    rep = cr.load_report(path)
    assert rep.schema_version == "1"
    info = rep.implementations["peft"]  # version 1 listed the methods among the capabilities
    assert (info.methods, info.capabilities) == (["lora"], ["4bit"])
    r = rep.results[0]
    assert r.measurements == {"examples": 40, "worst_ratio": 1.5}
    assert r.details == {"exploring": True, "steps_per_op": {"merge": 3}, "violations": ["lora/4bit merge"]}
    assert r.reproducers == ["/r/repro_1.py", "/r/repro_2.py"] and r.notes == ["shrinking was cut"]
    assert r.cases_skipped == {"input_cast": 6}
    assert r.families == {"lora/4bit": cr.Family(Outcome.FAILED, message="merged off"),
                          "lora/8bit": cr.Family(Outcome.PASSED)}
    assert not r.families["lora/4bit"].counted  # schema "1" kept no case counts here
    # the Markdown says what it said: the family texts, the skipped cases, the reproducer link, no notes
    md = report.markdown(rep, base=tmp_path)
    for row in ("| families.lora/4bit | failed: merged off |", "| families.lora/8bit | passed |",
                "| cases_skipped.input_cast | 6 |", "| steps_per_op.merge | 3 |",
                "| reproducer | [`repro_1.py`]", "| reproducers | /r/repro_1.py, /r/repro_2.py |"):
        assert row in md, row
    assert "shrinking was cut" not in md and "## Cases per family" not in md
    assert "Reproducer: [`repro_1.py`]" in md and "[`repro_2.py`]" in md
    assert report.markdown(_v1_doc(), base=tmp_path) == md  # the document or the record: the same page
    # written again as schema 2, it compares equal to itself and to the file
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps(rep.to_json()))
    text, status = report.compare(cr.load_report(path), cr.load_report(v2))
    assert status == 0 and "New failures: 0" in text and "Other outcome changes: 0" in text
    assert "Measurement drift > 25%: 0" in text


@pytest.mark.parametrize("doc, words", [
    ({"schema_version": "3", "results": []}, "has schema_version 3, this tool reads 1 and 2"),
    ({"schema_version": "1", "probe": {}}, "is not a conformance report"),
    ({"schema_version": "1", "results": [{"clause": "A", "implementation": "x", "outcome": "weird"}]},
     r"result A \[x\] has outcome 'weird'"),
    ({"schema_version": "2", "results": [{"clause": "A"}]}, "lacks clause, implementation or outcome"),
])
def test_a_file_that_is_no_report_is_one_line(tmp_path: Path, doc: dict, words: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(cr.ReportError, match=words) as info:
        cr.load_report(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_joiners_read_both_schemas(tmp_path: Path) -> None:
    v1 = _v1_doc()
    v2 = cr.Report.from_json(_v1_doc()).to_json()
    doc = join.join([("v1.json", v1), ("v2.json", v2)])
    cols = [c["id"] for c in doc["columns"]]
    assert doc["cells"]["STATE-OUTPUT-MATCHES-MODEL"] == {c: {"outcome": "failed", "message": V1_RESULT["message"]}
                                                           for c in cols}
    assert doc["first_change"] == {} and all(doc["summary"][c]["must_failures"] == 1 for c in cols)
    from conformance.ci import matrix_report

    for name, d in (("cell-v1", v1), ("cell-v2", v2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "conformance.json").write_text(json.dumps(d))
    m = matrix_report.join(tmp_path)
    assert [r["outcomes"] for r in m["rows"]] == [{"cell-v1": "failed", "cell-v2": "failed"}]
    assert m["cells"]["cell-v1"]["messages"] == m["cells"]["cell-v2"]["messages"] == {
        "peft STATE-OUTPUT-MATCHES-MODEL": V1_RESULT["message"]}
    assert "| peft | STATE-OUTPUT-MATCHES-MODEL | MUST | FAIL | FAIL |" in matrix_report.markdown(m)


def test_one_table_of_outcome_marks() -> None:
    """Every outcome has its marks in ``core.outcome.MARKS``; the join, the matrix report and the Markdown report
    show those, and no two outcomes share a mark."""
    from conformance.ci import matrix_report

    assert list(MARKS) == list(OUTCOMES)
    for kind in ("text", "symbol", "meaning"):
        values = [getattr(m, kind) for m in MARKS.values()] + [getattr(NOT_RUN, kind)]
        assert len(set(values)) == len(values), kind
    assert join.MARKS == matrix_report.MARKS == TEXT_MARKS == {o: m.text for o, m in MARKS.items()}
    assert report.MARKS == {o: m.symbol for o, m in MARKS.items()}
    assert join.mark(None) == NOT_RUN.text and join.mark("inconclusive") == "INCONCL"


@pytest.mark.e2e
def test_cli_compares_a_stored_v1_baseline_with_a_v2_report(tmp_path: Path) -> None:
    stored = ROOT / "baselines" / "conformance" / "cpu-torch2.13.0-bnb0.50.2.json"
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps(cr.load_report(stored).to_json()))
    for old, new in ((stored, v2), (v2, stored)):
        proc = subprocess.run([sys.executable, "-m", "conformance", "compare", str(old), str(new)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "New failures: 0" in proc.stdout and "Other outcome changes: 0" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, "-m", "conformance", "markdown", str(v2)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "## Measurements" in proc.stdout, proc.stderr
