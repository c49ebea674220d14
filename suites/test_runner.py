"""The runner isolates implementations: crashes, hangs and exceptions become ``error`` outcomes.

The whole module is the ``e2e`` tier (fork servers, CLI subprocesses, signals). The fault tests share one
fork server for the session (``fork_server("conformance.clauses.faults:faults")``: a fault per clause), and the reference's
server is shared too; each run still forks its own worker, which is what isolation is about.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.clauses.clause import get
from conformance.harness import report, runner, xfails
from conformance.harness.results import Result

# tooling, not device code: CPU CI runs it; the gpu session leaves it out
pytestmark = [pytest.mark.cpu_only, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its conformance.clauses.faults is importable


@pytest.fixture(autouse=True)
def _checkout_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _run(impl: str, **kw) -> list[Result]:
    return runner.run_implementation(impl, [get("LAYER-PROTOCOL-SURFACE")], progress=lambda m: None, **kw)


def _quiet(_msg: str) -> None:
    pass


def _faults(fork_server, *ids: str, timeout_s: float | None = None) -> list[Result]:  # noqa: ANN001 - the fixture
    """Run ``ids`` on the shared ``conformance.clauses.faults:faults`` server (FAULTS says which clause does what);
    ``timeout_s`` replaces each clause's own time limit (the runner reads it from the clause given)."""
    clauses = [get(i, bound=False) for i in ids]
    if timeout_s is not None:
        clauses = [dataclasses.replace(c, timeout_s=timeout_s) for c in clauses]
    return fork_server("conformance.clauses.faults:faults").run(clauses, _quiet)


@pytest.mark.parametrize("fork", [True, False], ids=["fork-server", "fresh-interpreter"])
def test_segfault_is_an_error_and_the_run_completes(fork: bool, fork_server) -> None:  # noqa: ANN001
    if fork:  # FWD-ERR-ADAPTER-NAME segfaults in faults; the clause after it still runs
        res = _faults(fork_server, "FWD-ERR-ADAPTER-NAME", "FWD-ERR-SHAPE")
        assert res[1].outcome == "passed", res[1].message
    else:
        res = _run("conformance.clauses.faults:segfault", fork=False)
    assert res[0].outcome == "error"
    assert "SIGSEGV" in res[0].message


def test_time_limit_is_the_clauses_scaled_unless_given() -> None:
    """``--timeout-scale`` multiplies each clause's own limit, ``--timeout`` replaces it (what a hang runs into)."""
    clause = get("FWD-INIT-IDENTITY", bound=False)
    assert runner.RunConfig().limit(clause) == clause.timeout_s
    assert runner.RunConfig(timeout_scale=3 / 300).limit(clause) == clause.timeout_s * 3 / 300
    assert runner.RunConfig(timeout=2, timeout_scale=3 / 300).limit(clause) == 2
    assert runner.RunConfig(timeout_scale=3 / 300).limit(dataclasses.replace(clause, timeout_s=600)) == 6


def _ids(*ids: str) -> list:
    return [get(i, bound=False) for i in ids]


def test_a_hang_costs_only_its_clause(fork_server) -> None:  # noqa: ANN001
    """The clause that hangs times out (saying which option changes it); the clauses after it still run."""
    res = _faults(fork_server, "FWD-ERR-RANK", "FWD-INIT-IDENTITY", "FWD-ERR-SHAPE", timeout_s=2)
    assert [(r.clause, r.outcome) for r in res] == [
        ("FWD-ERR-RANK", "passed"), ("FWD-INIT-IDENTITY", "error"), ("FWD-ERR-SHAPE", "passed")]
    assert "timed out after 2 s (--timeout changes it)" in res[1].message


def test_an_abort_in_every_merge_clause_costs_only_those_clauses(fork_server) -> None:  # noqa: ANN001
    res = _faults(fork_server, "MERGE-TWICE-WARNS", "FWD-ERR-RANK", "MERGE-SUBSET", "FWD-ERR-SHAPE")
    outcomes = {r.clause: r.outcome for r in res}
    assert outcomes == {"MERGE-TWICE-WARNS": "error", "FWD-ERR-RANK": "passed", "MERGE-SUBSET": "error",
                        "FWD-ERR-SHAPE": "passed"}
    for r in res:
        if r.outcome == "error":
            assert "killed by signal SIGABRT while running this clause" in r.message, r.message


def test_no_fork_server_after_cuda_was_initialised_while_loading(fork_server) -> None:  # noqa: ANN001
    with runner.open_implementation("conformance.clauses.faults:inits_cuda") as loaded:
        assert loaded.workers.kind == "fresh-interpreter"
        (res,) = loaded.run(_ids("LAYER-PROTOCOL-SURFACE"), progress=lambda m: None)
    assert res.outcome == "passed", res.message
    assert fork_server("reference").workers.kind == "fork-server"


def test_budget_and_report_dir_reach_the_check_context(tmp_path: Path) -> None:
    (res,) = runner.run_implementation("conformance.clauses.faults:echo_context", _ids("LAYER-PROTOCOL-SURFACE"), examples=3,
                                       steps=2, report_dir=str(tmp_path), progress=lambda m: None)
    assert res.outcome == "failed"  # create() raised: the implementation's failure, with its message
    assert "'property_examples': 3, 'stateful_examples': 3, 'stateful_steps': 2" in res.message, res.message
    assert f"report_dir={tmp_path}" in res.message


def test_an_exception_out_of_create_is_the_implementations_failure_with_its_message(fork_server) -> None:  # noqa: ANN001
    (res,) = _faults(fork_server, "LIFECYCLE-TRAINABLE")
    assert res.outcome == "failed"
    assert "boom from a broken implementation" in res.message and "raised in the implementation at" in res.message


def test_protocol_clause_fails_on_a_non_module(fork_server) -> None:  # noqa: ANN001
    (res,) = _faults(fork_server, "LAYER-PROTOCOL-SURFACE")
    assert res.outcome == "failed"
    assert "not an nn.Module" in res.message


def test_unknown_implementation_is_a_usage_error() -> None:
    with pytest.raises(runner.UsageError, match="unknown implementation 'nope'"):
        runner.describe("nope")


def test_cli_bad_usage_exits_2_with_one_line(tmp_path: Path) -> None:
    for args in (["run", "--impl", "nope"], ["run", "--xfails", str(tmp_path / "missing.txt")],
                 ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]):
        proc = subprocess.run([sys.executable, "-m", "conformance", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_run_writes_reports_and_exit_code(tmp_path: Path) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "run", "--impl", "reference", "--impl", "conformance.clauses.faults:not_a_module",
         "--clauses", "LAYER-PROTOCOL-*", "--report", str(out), "--markdown", str(md)],
        capture_output=True, text=True, env=os.environ | {"PYTHONPATH": os.environ["PYTHONPATH"]},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == report.SCHEMA_VERSION
    assert {"python", "packages", "device", "suite_version"} <= set(doc["environment"])
    outcomes = {(r["clause"], r["implementation"]): r["outcome"] for r in doc["results"]}
    assert outcomes == {("LAYER-PROTOCOL-SURFACE", "reference"): "passed",
                        ("LAYER-PROTOCOL-SURFACE", "not_a_module"): "failed"}
    text = md.read_text()
    assert re.search(r"\| `LAYER-PROTOCOL-SURFACE` \| MUST \| ✅ [0-9.]+ s \| ❌ [0-9.]+ s \|", text), text
    assert "not an nn.Module" in text
    assert "[reference] 1/1 LAYER-PROTOCOL-SURFACE" in proc.stderr  # progress output

    # an xfail entry turns the failure into xfailed and the exit code into 0; --xfails is repeatable
    # (a common list plus a device-specific one), and an entry in the second file counts
    common = tmp_path / "common.txt"
    common.write_text("MERGE-* not_a_* unrelated entry\n")
    xf = tmp_path / "xfails.txt"
    xf.write_text("LAYER-PROTOCOL-* not_a_* returns a plain object on purpose\n")
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "run", "--impl", "conformance.clauses.faults:not_a_module", "--clauses",
         "LAYER-PROTOCOL-SURFACE", "--xfails", str(common), "--xfails", str(xf), "--report", str(out)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["results"][0]["outcome"] == "xfailed"


def test_unwritable_report_path_is_a_usage_error_before_the_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for option in ("--report", "--markdown"):
        proc = subprocess.run([sys.executable, "-m", "conformance", "run", option, str(blocker / "sub" / "r.out")],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert f"error: {option} {blocker / 'sub' / 'r.out'}: cannot create its folder" in proc.stderr
        assert "loading implementation" not in proc.stderr and "Traceback" not in proc.stderr


def _doc(outcome: str, ratio: float) -> dict:
    r = Result("X-Y", "impl", outcome, "msg", 0.1, {"worst_ratio": ratio})
    return {"schema_version": "1", "environment": {}, "results": [r.to_json()]}


def test_compare_reports_new_failures_fixes_and_drift() -> None:
    text, status = report.compare(_doc("passed", 0.5), _doc("failed", 0.9))
    assert status == 1 and "New failures: 1" in text and "worst_ratio: 0.5 -> 0.9" in text
    text, status = report.compare(_doc("failed", 0.5), _doc("passed", 0.5))
    assert status == 0 and "Fixed: 1" in text


def test_xfail_file_parsing(tmp_path: Path) -> None:
    entries = xfails.parse("# comment\nMERGE-* peft known upstream bug  # trailing\n\n")
    assert entries[0].matches("MERGE-BOUND", "peft") and not entries[0].matches("MERGE-BOUND", "reference")
    with pytest.raises(xfails.XfailFileError, match="<xfails>:1"):
        xfails.parse("ONLY-ID\n")


def test_fingerprint_names_the_sources_that_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source hash changes with any suite source file, whatever git says (device copies carry a stale .git)."""
    import conformance
    from conformance.harness import environment

    pkg = tmp_path / "conformance"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    monkeypatch.setattr(conformance, "__file__", str(pkg / "__init__.py"))
    first = environment.source_sha()
    (pkg / "__init__.py").write_text("x = 2\n")
    second = environment.source_sha()
    assert len(first) == 12 and first != second
    env = {"suite_version": "0.1.0", "suite_git_sha": "abc-dirty", "suite_source_sha256": second}
    assert f"(sources {second})" in report._fmt_env(env)


def _other_interpreter(tmp_path: Path) -> str:
    """This interpreter under another path (a wrapper script): to the runner, another environment."""
    script = tmp_path / "env" / "bin" / "python"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_implementation_runs_in_the_interpreter_given(tmp_path: Path, fork_server) -> None:  # noqa: ANN001
    python = _other_interpreter(tmp_path)
    with runner.open_implementation("reference", python=python) as loaded:
        assert loaded.info.python == python
        assert loaded.info.packages["torch"] and loaded.info.packages["python"] == sys.version.split()[0]
        (res,) = loaded.run([get("LAYER-PROTOCOL-SURFACE")], lambda m: None)
    assert res.outcome == "passed", res.message
    here = fork_server("reference")  # this interpreter: nothing recorded
    assert here.info.python == "" and here.info.packages == {}


@pytest.mark.parametrize("content, mode, words", [
    (None, 0, "does not exist"),
    ("", 0o644, "not executable"),
    ("#!/bin/sh\necho 'boom' >&2\nexit 3\n", 0o755, "cannot run the suite's workers (boom)"),
], ids=["missing", "not-executable", "fails"])
def test_a_bad_interpreter_is_a_usage_error_before_any_worker(tmp_path: Path, content: str | None, mode: int,
                                                              words: str) -> None:
    python = tmp_path / "python"
    if content is not None:
        python.write_text(content)
        python.chmod(mode)
    python = str(python)
    with pytest.raises(runner.UsageError, match=re.escape(words)):
        with runner.open_implementation("reference", python=python):
            pass


def test_cli_report_records_the_other_interpreter(tmp_path: Path) -> None:
    python = _other_interpreter(tmp_path)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "conformance", "run", "--impl", f"reference@{python}", "--clauses",
                           "LAYER-PROTOCOL-SURFACE", "--report", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"in {python}" in proc.stderr
    impl = json.loads(out.read_text())["implementations"]["reference"]
    assert impl["python"] == python and impl["packages"]["bitsandbytes"]
