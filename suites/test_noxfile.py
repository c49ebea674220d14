"""The front door: nox sessions, the version matrix table, the joined matrix report, CI workflows.

Cheap: no session is run (``nox -l`` only loads the noxfile), no package is installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conformance import matrix as mx

# tooling, not device code: CPU CI runs it; the gpu session leaves it out
pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = ("tests", "report", "lint", "gpu", "matrix_report", "regress", "bench", "compare", "stateful")
GPU_LABELS = ["self-hosted", "linux", "x64", "gpu"]


@pytest.fixture(scope="module")
def nox_list() -> dict[str, str]:
    """`nox -l` output: session name -> description."""
    pytest.importorskip("nox")
    out = subprocess.run([sys.executable, "-m", "nox", "-l", "-f", str(ROOT / "noxfile.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^[*-] (\S+(?:\(.*?\))?)(?: \[[^\]]*\])? -> (.*)$", line)
        if m:
            listed[m.group(1)] = m.group(2)
    return listed


@pytest.fixture(scope="module")
def noxfile() -> ModuleType:
    pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location("_noxfile_under_test", ROOT / "noxfile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_nox_lists_every_session_with_a_description(nox_list: dict[str, str]) -> None:
    for name in SESSIONS:
        assert name in nox_list, f"nox -l does not list {name}: {sorted(nox_list)}"
        assert len(nox_list[name]) > 20, f"session {name} has no real docstring: {nox_list[name]!r}"
    for c in mx.CELLS:
        assert c.session in nox_list, f"matrix cell {c.session} missing from nox -l"


def test_matrix_table_is_consistent() -> None:
    pin = (ROOT / "constraints" / "cpu.txt").read_text()
    assert re.search(rf"^torch=={re.escape(mx.CPU_TORCH)}\s*$", pin, re.M), "CPU_TORCH must equal constraints/cpu.txt"
    assert len(mx.BNB_AXIS) >= 3
    assert len({c.id for c in mx.CELLS}) == len(mx.CELLS) == len({c.session for c in mx.CELLS})
    for c in mx.CELLS:
        assert c.torch in mx.COMPANIONS, f"{c.id}: torch {c.torch} has no companions row"
        assert c.needs_gpu == (c.torch != mx.CPU_TORCH)
        assert "gpu-cell" in c.tags if c.needs_gpu else "cpu-cell" in c.tags
        assert all(re.fullmatch(r"[a-z-]+==\d+(\.\d+)+", p) for p in c.pins()), c.pins()
        assert mx.cell(c.torch, c.bnb) == c
    assert {c.bnb for c in mx.CELLS if "bnb-axis" in c.tags} == set(mx.BNB_AXIS)
    assert all(not c.needs_gpu for c in mx.CELLS if "bnb-axis" in c.tags), "the bnb axis must run on a CPU machine"
    assert {c.torch for c in mx.CELLS if "torch-axis" in c.tags} == set(mx.TORCH_AXIS)
    with pytest.raises(KeyError):
        mx.cell("0.0.1", "0.0.1")
    table = mx.versions_table()
    assert table.count("\n") == len(mx.CELLS) + 2


def test_matrix_module_is_stdlib_only() -> None:
    """The noxfile loads conformance/matrix.py by path under nox's interpreter (no torch there)."""
    tree = ast.parse((ROOT / "conformance" / "matrix.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert mods <= set(sys.stdlib_module_names) | {"__future__"}, mods - set(sys.stdlib_module_names)


def _cell_dir(root: Path, torch: str, bnb: str, outcomes: dict[str, str], clone_required: bool,
              missing_probe: bool = False) -> Path:
    d = root / f"torch{torch}-bnb{bnb}"
    d.mkdir(parents=True)
    env = {"device": "cpu", "packages": {"torch": f"{torch}+cpu", "bitsandbytes": bnb, "peft": "0.21.2"}}
    (d / "cell.json").write_text(json.dumps({"id": d.name, "torch": torch, "bnb": bnb, "device": "cpu",
                                             "status": "ok", "installed": {"transformers": "5.23.0"}}))
    results = [{"clause": k, "implementation": impl, "outcome": o, "message": "boom" if o == "failed" else "",
                "level": "MUST"} for (impl, k), o in ((tuple(key.split(" ")), o) for key, o in outcomes.items())]
    summary: dict[str, Any] = {}
    for r in results:
        s = summary.setdefault(r["implementation"], {"passed": 0, "failed": 0, "error": 0, "skipped": 0,
                                                     "must_failures": 0})
        s[r["outcome"]] += 1
        s["must_failures"] += r["outcome"] == "failed"
    (d / "conformance.json").write_text(json.dumps({
        "schema_version": "1", "environment": env, "implementations": {"reference": {"version": "0.1.0"},
                                                                       "peft": {"version": "0.21.2"}},
        "clauses": {k.split(" ")[1]: {"level": "MUST"} for k in outcomes}, "results": results,
        "summary": {"implementations": summary, "exit_status": 0}}))
    if not missing_probe:
        (d / "clone.json").write_text(json.dumps({"environment": env, "cases": [{}] * 10, "verdict": {
            "clone_required": clone_required, "line": "x", "cases": 10, "required": ["a"] * (3 if clone_required else 0),
            "both_fail": []}}))
    return d


def test_matrix_report_joins_two_cells(tmp_path: Path) -> None:
    _cell_dir(tmp_path, "2.13.0", "0.48.2", {"reference FWD-A": "passed", "peft FWD-A": "failed",
                                             "peft MERGE-B": "passed"}, clone_required=True)
    _cell_dir(tmp_path, "2.13.0", "0.50.2", {"reference FWD-A": "passed", "peft FWD-A": "passed",
                                             "peft MERGE-B": "passed"}, clone_required=False, missing_probe=True)
    doc = mx.join(tmp_path)
    assert list(doc["cells"]) == ["torch2.13.0-bnb0.48.2", "torch2.13.0-bnb0.50.2"]
    assert "torch2.13.0-bnb0.49.2" in doc["not_run"]
    rows = {(r["implementation"], r["clause"]): r for r in doc["rows"]}
    assert rows[("peft", "FWD-A")]["varies"] and not rows[("peft", "MERGE-B")]["varies"]
    assert rows[("peft", "FWD-A")]["outcomes"] == {"torch2.13.0-bnb0.48.2": "failed", "torch2.13.0-bnb0.50.2": "passed"}
    assert doc["rows"][0]["implementation"] == "reference"
    c48, c50 = doc["cells"]["torch2.13.0-bnb0.48.2"], doc["cells"]["torch2.13.0-bnb0.50.2"]
    assert c48["clone"]["clone_required"] is True and c48["clone"]["required"] == 3
    assert c50["clone"] is None and c50["missing"] == ["clone.json"]
    assert c48["installed"]["transformers"] == "5.23.0" and c48["installed"]["bitsandbytes"] == "0.48.2"
    md = mx.markdown(doc)
    assert "| peft | FWD-A **Δ** | MUST | FAIL | pass |" in md
    assert "**required**: 3/10 cases" in md and "not run" in md and "missing clone.json" in md
    out_json, out_md = tmp_path / "out" / "m.json", tmp_path / "out" / "m.md"
    assert mx.main(["report", "--in", str(tmp_path), "--json", str(out_json), "--markdown", str(out_md)]) == 0
    assert json.loads(out_json.read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    assert out_md.read_text().startswith("# Conformance matrix")
    assert mx.main(["report", "--in", str(tmp_path / "nothing")]) == 1


def _workflow(name: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    assert isinstance(doc, dict) and doc.get("jobs"), f"{name}: no jobs"
    assert True in doc or "on" in doc, f"{name}: no trigger"  # YAML 1.1 reads the key `on` as True
    return doc


def test_workflows_are_valid_and_use_the_documented_labels(nox_list: dict[str, str]) -> None:
    gpu, cpu = _workflow("gpu.yml"), _workflow("cpu.yml")
    docs = (ROOT / "docs" / "nox.md").read_text()
    for job in gpu["jobs"].values():
        assert job["runs-on"] == GPU_LABELS
    assert "[" + ", ".join(GPU_LABELS) + "]" in docs, "docs/nox.md must document the GPU runner labels"
    assert all(job["runs-on"] == "ubuntu-latest" for job in cpu["jobs"].values())
    assert "ubuntu-latest" in docs
    runs = [s.get("run", "") for wf in (gpu, cpu) for job in wf["jobs"].values() for s in job["steps"]]
    assert any("nox -s gpu" in r for r in runs) and any("nox -s lint tests" in r for r in runs)
    uploads = [s for job in gpu["jobs"].values() for s in job["steps"] if "upload-artifact" in str(s.get("uses"))]
    assert any(s["with"]["path"] == "reports/" for s in uploads)
    for r in runs:  # every session a workflow names exists
        for name in re.findall(r"nox -s ([a-z_]+)(?:\s|$)", r):
            assert name in nox_list, f"workflow runs unknown session {name}"
    cpu_cells = cpu["jobs"]["bnb-axis"]["strategy"]["matrix"]["cell"]
    gpu_cells = gpu["jobs"]["torch-axis"]["strategy"]["matrix"]["cell"]
    assert cpu_cells == [c.session for c in mx.CELLS if "bnb-axis" in c.tags]
    assert gpu_cells == [c.session for c in mx.CELLS if "torch-axis" in c.tags]


class _FakeSession:
    def __init__(self, fail_codes: dict[str, int] | None = None) -> None:
        self.logs: list[str] = []
        self.ran: list[list[str]] = []
        self.fail_codes = fail_codes or {}

    def log(self, msg: str) -> None:
        self.logs.append(msg)

    warn = log

    def error(self, msg: str) -> None:
        raise RuntimeError(msg)

    def run(self, *cmd: str, success_codes: list[int], **_: Any) -> None:
        from nox.command import CommandFailed

        self.ran.append(list(cmd))
        rc = self.fail_codes.get(cmd[2], 0)
        if rc not in success_codes:
            raise CommandFailed(f"rc {rc}", return_code=rc)


def test_steps_fail_loudly_on_a_missing_module(noxfile: ModuleType, tmp_path: Path) -> None:
    s = _FakeSession(fail_codes={"json.tool": 1})
    steps = noxfile._Steps(s, sys.executable, {}, tmp_path)
    assert not steps.run("probe", "json", [], needs=("json.no_such_module_xyz",))
    assert steps.run("ok", "json", [])
    assert steps.run("findings", "json.tool", [], success=(0, 1))
    assert not steps.run("broken", "json.tool", [])
    assert s.ran == [[sys.executable, "-m", "json"], [sys.executable, "-m", "json.tool"]] + [
        [sys.executable, "-m", "json.tool"]]
    assert any("MISSING" in m and "json.no_such_module_xyz" in m for m in s.logs)
    with pytest.raises(RuntimeError, match="2 step\\(s\\) failed: probe, broken"):
        steps.finish("t")
    summary = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert [r["status"] for r in summary] == ["missing module", "ok", "ok", "failed (rc=1)"]


def test_newest_baseline_picks_the_device(noxfile: ModuleType, tmp_path: Path) -> None:
    assert noxfile._newest_baseline(tmp_path / "none", "cuda") is None
    for name, dev, when in (("a.json", "cuda", "2026-01-01"), ("b.json", "cuda", "2026-03-01"),
                            ("c.json", "cpu", "2026-09-01")):
        (tmp_path / name).write_text(json.dumps({"environment": {"device": dev}, "generated_at": when}))
    (tmp_path / "junk.json").write_text("{")
    assert noxfile._newest_baseline(tmp_path, "cuda").name == "b.json"
    assert noxfile._newest_baseline(tmp_path, "cpu").name == "c.json"


def test_newest_baseline_without_dates_prefers_newest_versions(noxfile: ModuleType, tmp_path: Path) -> None:
    for name, torch in (("x.json", "2.13.0+cu128"), ("y.json", "2.9.1+cu128")):
        (tmp_path / name).write_text(json.dumps({"environment": {"device": "cuda", "packages": {"torch": torch}}}))
    assert noxfile._newest_baseline(tmp_path, "cuda").name == "x.json"


def test_gpu_session_fails_at_once_without_cuda() -> None:
    """`nox -s gpu` on a machine without CUDA: a clear message, nothing run or installed."""
    pytest.importorskip("nox")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    out = subprocess.run([sys.executable, "-m", "nox", "--no-venv", "-f", str(ROOT / "noxfile.py"), "-s", "gpu",
                          "--", "--interpreter", sys.executable, "--reports-dir", "/nonexistent/never-written"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "no CUDA device visible" in text and "torch.cuda.is_available() == False" in text, text[-2000:]
    assert "step pytest" not in text and not Path("/nonexistent/never-written").exists()
