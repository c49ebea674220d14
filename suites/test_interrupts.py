"""Ctrl-C at every named point of a run: exit 130, the partial report, no traceback, no worker left behind.

Each run is driven to its point by ``CONFORMANCE_SIGINT_AT`` (``conformance.harness.interrupts``): the
runner sends itself the SIGINT there, so no test sleeps or races a progress line. A second entry is a
second Ctrl-C. ``sigint_in_lock.py`` delivers one while the runner holds the fork server's reply-queue
lock, the window in which a run used to hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conformance.harness import interrupts

pytestmark = [pytest.mark.cpu_only, pytest.mark.e2e]

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
SAFETY_S = 600  # only a broken runner gets near this; a passing run takes seconds
BOTH = ("LAYER-PROTOCOL-SURFACE", "FWD-ERR-SHAPE")  # catalog order runs FWD-ERR-SHAPE first
HANGS = "conformance.clauses.faults:hang_in_protocol"  # FWD-ERR-SHAPE passes, LAYER-PROTOCOL-SURFACE never returns


def _alive(mark: str) -> list[int]:
    """Processes whose environment carries ``mark`` (the run's workers inherit it), once those already
    sent SIGKILL have had time to go: a killed process lingers until the kernel has torn it down."""
    def scan() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if mark.encode() in (d / "environ").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    continue
        return pids

    for _ in range(300):  # a bound for a broken runner, not a measurement: survivors are reported
        if not (pids := scan()):
            return []
        time.sleep(0.1)
    return pids


def _run(tmp_path: Path, impl: str, clauses: tuple[str, ...], at: str, *, script: Path | None = None,
         old_report: str | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "r.json"
    if old_report is not None:
        out.write_text(old_report)
    mark = f"CONFORMANCE_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "CONFORMANCE_SIGINT_AT": at, mark.split("=")[0]: mark.split("=")[1],
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "conformance"]
    args = ["run", "--impl", impl, *(a for c in clauses for a in ("--clauses", c)), "--report", str(out),
            "--markdown", str(tmp_path / "r.md")]
    proc = subprocess.run([*head, *args], capture_output=True, text=True, timeout=SAFETY_S, env=env,
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == interrupts.EXIT_INTERRUPTED, proc.stdout + proc.stderr
    assert not (left := _alive(mark)), f"workers outlived the run: {left}"
    return proc, out


def _outcomes(out: Path) -> tuple[list[tuple[str, str]], list[str]]:
    doc = json.loads(out.read_text())
    return [(r["clause"], r["outcome"]) for r in doc["results"]], [n["clause"] for n in doc.get("not_run") or []]


@pytest.mark.parametrize(("at", "done"), [
    ("load", []),  # the fork server started, the implementation not loaded yet
    ("loaded", []),  # loaded, no clause started
    ("clause:2", [("FWD-ERR-SHAPE", "passed")]),  # inside the clause that hangs
    ("between:1", [("FWD-ERR-SHAPE", "passed")]),  # after a result, before the next clause
])
def test_first_ctrl_c_writes_the_partial_report_and_exits_130(tmp_path: Path, at: str, done: list) -> None:
    proc, out = _run(tmp_path, HANGS, BOTH, at)
    results, not_run = _outcomes(out)
    assert results == done
    assert sorted(not_run) == sorted(set(BOTH) - {c for c, _ in done})
    assert "interrupted" in proc.stdout and "passed" in proc.stdout.splitlines()[1]  # the summary table
    assert "⏹️" in (tmp_path / "r.md").read_text()


def test_ctrl_c_while_a_worker_is_hung(tmp_path: Path) -> None:
    _proc, out = _run(tmp_path, "conformance.clauses.faults:hang", ("FWD-ERR-SHAPE",), "hung")
    assert _outcomes(out) == ([], ["FWD-ERR-SHAPE"])


def test_ctrl_c_inside_the_reply_queue_lock_does_not_hang(tmp_path: Path) -> None:
    """The hang seen under load: the SIGINT landed while the runner held the fork server's reply-queue lock."""
    _proc, out = _run(tmp_path, HANGS, BOTH, "", script=FIXTURES / "sigint_in_lock.py")
    assert _outcomes(out) == ([("FWD-ERR-SHAPE", "passed")], ["LAYER-PROTOCOL-SURFACE"])


def test_ctrl_c_while_the_report_is_written_keeps_the_whole_report(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "reference", ("FWD-ERR-SHAPE",), "write")
    assert _outcomes(out) == ([("FWD-ERR-SHAPE", "passed")], [])
    assert "the report is complete" in proc.stdout


@pytest.mark.parametrize("second", ["stop", "write"])
def test_second_ctrl_c_exits_at_once_and_an_earlier_report_survives(tmp_path: Path, second: str) -> None:
    old = '{"an": "earlier report"}\n'
    proc, out = _run(tmp_path, HANGS, BOTH, f"between:1,{second}", old_report=old)
    assert "interrupted again" in proc.stderr
    assert out.read_text() == old  # complete or absent, never truncated: here the earlier one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left behind


def test_check_implementation_raises_keyboard_interrupt_with_the_partial_results(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from conformance.harness.runner import Interrupted
    from conformance.testing import check_implementation

    mark = uuid.uuid4().hex
    monkeypatch.setenv("CONFORMANCE_TEST_RUN", mark)
    monkeypatch.setenv("CONFORMANCE_SIGINT_AT", "between:1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(KeyboardInterrupt) as info:
        check_implementation(HANGS, clauses=list(BOTH))
    assert isinstance(info.value, Interrupted)
    assert [(r.clause, r.outcome) for r in info.value.results] == [("FWD-ERR-SHAPE", "passed")]
    assert not _alive(f"CONFORMANCE_TEST_RUN={mark}")
