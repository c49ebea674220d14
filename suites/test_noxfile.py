"""The front door: nox sessions, ``conformance.ci`` (options, environments, steps, baselines), the
version matrix table and its joined report, CI workflows.

Cheap: no session is run and nothing is installed (``nox -l`` and one ``nox -s tests -- --help``).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conformance.ci import cell as ci_cell
from conformance.ci import envs, impls, regress, sessions
from conformance.ci import matrix as mx
from conformance.ci.__main__ import main as ci_main
from conformance.ci.baselines import newest_baseline
from conformance.ci.log import CIError
from conformance.ci.matrix_report import join, markdown
from conformance.ci.steps import Steps

# tooling, not device code: CPU CI runs it; the gpu session leaves it out
pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = ("tests", "report", "lint", "gpu", "matrix_report", "regress", "bench", "compare", "stateful",
            "compare_impls")
COMMANDS = (*SESSIONS, "matrix", "list", "impl", "joined")
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


@pytest.mark.e2e
def test_nox_lists_every_session_with_a_description(nox_list: dict[str, str]) -> None:
    for name in SESSIONS:
        assert name in nox_list, f"nox -l does not list {name}: {sorted(nox_list)}"
        assert len(nox_list[name]) > 20, f"session {name} has no real docstring: {nox_list[name]!r}"
    for c in mx.CELLS:
        assert c.session in nox_list, f"matrix cell {c.session} missing from nox -l"
    for name in impls.IMPL_ENVS:
        assert f"impl({name})" in nox_list, f"impl({name}) missing from nox -l"


def test_noxfile_sessions_only_call_the_package() -> None:
    """Every session body is a call of `conformance.ci` (matrix: plus its skip); no helper logic."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert set(funcs) == {*SESSIONS, "matrix", "impl", "_ci"}, sorted(funcs)
    for name, f in funcs.items():
        if name == "_ci":
            continue
        calls = [n for n in ast.walk(f) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_ci"]
        assert len(calls) == 1, name
        command = calls[0].args[1]
        assert isinstance(command, ast.Constant) and command.value == name, f"session {name}: {ast.dump(command)}"
        assert len(f.body) <= (7 if name == "matrix" else 2), f"session {name} is more than a few lines"
    assert "torch==" not in (ROOT / "noxfile.py").read_text(), "the CPU torch pin lives in constraints/cpu.txt alone"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"cmd-{c}")  # not `gpu`: a marker keyword
def test_every_command_answers_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ci_main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m conformance.ci {command}"), text[:200]
    assert "--fresh" in text or command in ("matrix_report", "list", "joined")


@pytest.mark.e2e
def test_nox_session_help_installs_nothing(tmp_path: Path) -> None:
    """The one real nox run: `nox -s tests -- --help` prints the options and exits 0 before any install."""
    pytest.importorskip("nox")
    out = subprocess.run([sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", "tests", "--", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: python -m conformance.ci tests" in out.stdout and "narrow" in out.stdout
    assert "pip" not in out.stdout + out.stderr.replace("nox > ", "")


def test_unknown_arguments_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ci_main(["gpu", "--no-such-option"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    assert ci_main(["matrix", "torch0.0-nothing"]) == 1
    assert "no matrix cell 'torch0.0-nothing'" in capsys.readouterr().err


@pytest.mark.e2e
def test_ci_package_is_stdlib_only_and_imports_no_torch() -> None:
    """nox imports conformance.ci under its own interpreter (no torch there)."""
    for path in sorted((ROOT / "conformance" / "ci").glob("*.py")):
        tree = ast.parse(path.read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and not n.level}
        assert mods <= set(sys.stdlib_module_names) | {"__future__"}, (path.name, mods - set(sys.stdlib_module_names))
    code = ("import sys, conformance.ci.__main__, conformance.ci.gpu, conformance.ci.cell, conformance.ci.regress, "
            "conformance.ci.matrix_report; bad = [m for m in ('torch', 'bitsandbytes', 'peft') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_cpu_torch_is_read_from_the_constraints_file(tmp_path: Path) -> None:
    pin = (ROOT / "constraints" / "cpu.txt").read_text()
    assert re.search(rf"^torch=={re.escape(mx.CPU_TORCH)}\s*$", pin, re.M)
    (tmp_path / "ok.txt").write_text("# CPU build\ntorch==9.8.7  # pinned\nnumpy<3\n")
    assert mx.read_cpu_torch(tmp_path / "ok.txt") == "9.8.7"
    (tmp_path / "none.txt").write_text("numpy<3\n")
    with pytest.raises(RuntimeError, match="exactly once"):
        mx.read_cpu_torch(tmp_path / "none.txt")
    with pytest.raises(RuntimeError, match="cannot read"):
        mx.read_cpu_torch(tmp_path / "missing.txt")


def test_matrix_table_is_consistent() -> None:
    assert len(mx.BNB_AXIS) >= 3
    assert len({c.id for c in mx.CELLS}) == len(mx.CELLS) == len({c.session for c in mx.CELLS})
    for c in mx.CELLS:
        assert c.needs_gpu == (c.torch != mx.CPU_TORCH)
        assert "gpu-cell" in c.tags if c.needs_gpu else "cpu-cell" in c.tags
        assert all(re.fullmatch(r"[a-z-]+==\d+(\.\d+)+", p) for p in c.pins()), c.pins()
        for p in c.pins():  # named by every pin
            name, ver = p.split("==")
            short = {"bitsandbytes": "bnb", "huggingface-hub": "hub"}.get(name, name)
            assert f"{short}{ver}" in c.id.split("-"), (c.id, p)
        assert (c.hub == mx.HUB_FOR_TRANSFORMERS_4) == c.transformers.startswith("4.")
        assert mx.cell(c.id) == c
    assert {c.bnb for c in mx.CELLS if "bnb-axis" in c.tags} == set(mx.BNB_AXIS)
    assert all(not c.needs_gpu for c in mx.CELLS if "bnb-axis" in c.tags), "the bnb axis must run on a CPU machine"
    assert {c.torch for c in mx.CELLS if "torch-axis" in c.tags} == set(mx.TORCH_AXIS)
    for t in mx.TORCH_AXIS:
        assert mx.torch_cell(t).bnb == mx.COMPANIONS[t].bnb
    with pytest.raises(KeyError):
        mx.cell("torch0.0.1")
    assert mx.versions_table().count("\n") == len(mx.CELLS) + 2


def test_peft_axis_cells() -> None:
    peft = {c.peft: c for c in mx.CELLS if "peft-axis" in c.tags}
    assert set(peft) == {"0.16.0", "0.17.1", "0.18.1", "0.19.1", "0.20.0", "0.21.2"}
    assert (peft["0.16.0"].transformers, peft["0.16.0"].accelerate, peft["0.16.0"].hub) == ("4.53.3", "1.8.1", "0.36.2")
    assert (peft["0.20.0"].transformers, peft["0.20.0"].accelerate, peft["0.20.0"].hub) == ("5.14.1", "1.14.0", None)
    assert all(c.torch == mx.CPU_TORCH and c.bnb == "0.50.2" for c in peft.values())
    old = peft["0.18.1"]
    assert old.impls == ("peft",) and not old.probe and old.files == ("cell.json", "conformance.json")
    # the current stack is one cell shared by three axes, with the full check
    assert {"bnb-axis", "torch-axis", "peft-axis"} <= set(peft["0.21.2"].tags) and peft["0.21.2"].probe


def test_cell_environment_pins_every_version() -> None:
    old = next(c for c in mx.CELLS if c.peft == "0.18.1")
    spec = ci_cell.cell_env(old, "cpu")
    assert spec.name == f"matrix-{old.id}" and spec.constraints == (mx.CPU_CONSTRAINTS,)
    assert {"bitsandbytes==0.50.2", "peft==0.18.1", "huggingface-hub==0.36.2"} <= set(spec.requirements)
    gpu_cell = next(c for c in mx.CELLS if c.needs_gpu)
    assert ci_cell.cell_env(gpu_cell, "cuda").constraints == ()


def test_regress_pins_the_bitsandbytes_of_the_torch_cell() -> None:
    spec = regress.regress_env("2.11.0", None, gpu_ok=True)
    assert "bitsandbytes==0.49.2" in spec.requirements and "peft==0.19.1" in spec.requirements
    assert spec.name == "regress-torch2.11.0"
    unknown = regress.regress_env("9.9.9", "https://example.invalid/cpu", gpu_ok=False)
    assert unknown.requirements[0] == "torch==9.9.9" and unknown.pip_options == ("--extra-index-url",
                                                                               "https://example.invalid/cpu")


# ------------------------------------------------------------------------------------------------
# environments: reuse by stamp, heartbeat


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """envs under tmp_path; venv creation and pip recorded instead of run."""
    calls: list[list[str]] = []
    monkeypatch.setattr(envs, "ENV_ROOT", tmp_path / "envs")

    def create(spec: envs.EnvSpec) -> None:
        Path(spec.python).parent.mkdir(parents=True)
        Path(spec.python).write_text("")
        calls.append(["create", spec.name])

    def pip(python: str, args: list[str], *, label: str) -> None:
        if "boom" in args:
            raise CIError("pip failed")
        calls.append(args)

    monkeypatch.setattr(envs, "_create", create)
    monkeypatch.setattr(envs, "pip", pip)
    return calls


def test_environment_is_reused_until_its_pins_change(fake_pip: list[list[str]], tmp_path: Path) -> None:
    cons = tmp_path / "c.txt"
    cons.write_text("torch==1.0\n")
    spec = envs.EnvSpec("cell", ("peft==0.1",), (cons,))
    assert envs.ensure(spec) == spec.python
    assert fake_pip == [["create", "cell"], ["install", "-c", str(cons), "peft==0.1"]]
    envs.ensure(spec)
    envs.ensure(envs.EnvSpec("cell", ("peft==0.1",), (cons,)))
    assert len(fake_pip) == 2, "same pins: nothing installed"
    cons.write_text("torch==2.0\n")
    envs.ensure(spec)
    assert len(fake_pip) == 3 and fake_pip[-1][0] == "install", "a changed constraint file installs again (same venv)"
    envs.ensure(spec, fresh=True)
    assert fake_pip[-2:] == [["create", "cell"], ["install", "-c", str(cons), "peft==0.1"]]
    stamp = json.loads((spec.path / envs.STAMP).read_text())
    assert stamp["digest"] == spec.digest() and stamp["pip_args"] == spec.pip_args()


def test_failed_install_leaves_no_stamp(fake_pip: list[list[str]]) -> None:
    spec = envs.EnvSpec("bad", ("boom",))
    with pytest.raises(CIError):
        envs.ensure(spec)
    assert not (spec.path / envs.STAMP).exists()
    with pytest.raises(CIError):  # tried again, not taken as installed
        envs.ensure(spec)


def test_shared_cpu_environment() -> None:
    spec = envs.cpu_env()
    assert spec.name == f"cpu-torch{mx.CPU_TORCH}" and spec.constraints == (mx.CPU_CONSTRAINTS,)
    assert spec.requirements == ("-e", ".[plot,test]")


@pytest.mark.e2e
def test_stream_prints_a_heartbeat_while_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    rc = envs.stream([sys.executable, "-c", "import time; time.sleep(1.5); print('done'); raise SystemExit(3)"],
                     label="install x", heartbeat_s=0.4)
    cap = capsys.readouterr()
    assert rc == 3 and "done" in cap.out
    assert "install x: still running" in cap.err


def test_tests_command_narrows_to_the_paths_given(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(envs, "ensure", lambda spec, fresh=False: "PY")
    monkeypatch.setattr(sessions, "run", lambda cmd, env=None: ran.append(cmd) or 0)
    monkeypatch.chdir(ROOT)
    assert ci_main(["tests", "suites/test_runner.py::test_x", "-k", "suites"]) == 0
    assert ci_main(["tests", "-x"]) == 0
    assert ran[0] == ["PY", "-m", "pytest", *sessions.PYTEST_DEFAULTS, "suites/test_runner.py::test_x", "-k", "suites"]
    assert ran[1] == ["PY", "-m", "pytest", "suites", *sessions.PYTEST_DEFAULTS, "-x"]
    assert not sessions.names_a_path("-k") and not sessions.names_a_path("no/such/file.py")


# ------------------------------------------------------------------------------------------------
# steps, baselines, gpu fail-fast


@pytest.mark.e2e
def test_steps_fail_loudly_on_a_missing_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = Steps(sys.executable, {}, tmp_path)
    assert not steps.run("probe", "calendar", [], needs=("json.no_such_module_xyz",))
    assert steps.run("ok", "calendar", ["2026", "1"])
    assert steps.run("findings", "calendar", ["--bogus"], success=(0, 2))
    assert not steps.run("broken", "calendar", ["--bogus"])
    assert not steps.run("crash", "calendar", [], expect=("out.json",))
    assert "MISSING" in capsys.readouterr().err
    with pytest.raises(CIError, match=r"3 step\(s\) failed: probe, broken, crash"):
        steps.finish("t")
    summary = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert [r["status"] for r in summary] == ["missing module", "ok", "ok", "failed (rc=2)", "failed (no out.json)"]


def test_a_gpu_cell_asked_for_the_cpu_runs_there() -> None:
    """`nox -s "matrix(<torch-axis cell>)" -- --device cpu` is not skipped where the cell's bitsandbytes has the CPU
    backend (the noxfile asked the skip with device cuda for every GPU cell before)."""
    gpu_cell = next(c for c in mx.CELLS if c.needs_gpu and c.cpu_runnable)
    cpu_cell = next(c for c in mx.CELLS if not c.needs_gpu)
    assert ci_cell.requested_device(gpu_cell, []) == "cuda" and ci_cell.requested_device(cpu_cell, []) == "cpu"
    assert ci_cell.requested_device(gpu_cell, ["--strict", "--device", "cpu"]) == "cpu"
    assert ci_cell.requested_device(gpu_cell, ["--device=cpu"]) == "cpu"
    assert ci_cell.requested_device(cpu_cell, ["--device", "cuda"]) == "cuda"
    assert ci_cell.skip_reason(gpu_cell, ci_cell.requested_device(gpu_cell, ["--device", "cpu"])) is None
    assert "skip_reason(\n        c, requested_device(c, session.posargs))" in (ROOT / "noxfile.py").read_text()
    old = next((c for c in mx.CELLS if c.needs_gpu and not c.cpu_runnable), None)
    if old is not None and not ci_cell.gpu_visible()[0]:
        assert "no CPU backend" in ci_cell.skip_reason(old, ci_cell.requested_device(old, ["--device", "cpu"]))


def test_newest_baseline_picks_the_device(tmp_path: Path) -> None:
    assert newest_baseline(tmp_path / "none", "cuda") is None
    for name, dev, when in (("a.json", "cuda", "2026-01-01"), ("b.json", "cuda", "2026-03-01"),
                            ("c.json", "cpu", "2026-09-01")):
        (tmp_path / name).write_text(json.dumps({"environment": {"device": dev}, "generated_at": when}))
    (tmp_path / "junk.json").write_text("{")
    assert newest_baseline(tmp_path, "cuda").name == "b.json"
    assert newest_baseline(tmp_path, "cpu").name == "c.json"


def test_newest_baseline_without_dates_prefers_newest_versions(tmp_path: Path) -> None:
    for name, torch in (("x.json", "2.13.0+cu128"), ("y.json", "2.9.1+cu128")):
        (tmp_path / name).write_text(json.dumps({"environment": {"device": "cuda", "packages": {"torch": torch}}}))
    assert newest_baseline(tmp_path, "cuda").name == "x.json"


@pytest.mark.e2e
def test_gpu_fails_at_once_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Offline and installing: a clear message, nothing run or installed, no artefact directory."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    monkeypatch.setattr(envs, "ENV_ROOT", tmp_path / "envs")
    out = tmp_path / "never-written"
    assert ci_main(["gpu", "--offline", "--interpreter", sys.executable, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no CUDA device visible" in err and "torch.cuda.is_available() == False" in err, err[-2000:]
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert ci_main(["gpu", "--out", str(out)]) == 1
    assert "nothing was installed" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "envs").exists()


def test_gpu_plan_lists_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    assert ci_main(["gpu", "--plan", "--steps", "conformance,clone_probe", "--xfails", "a.txt", "--out", "/x"]) == 0
    text = capsys.readouterr().out
    assert "conformance  python -m conformance run --impl reference --impl peft --device cuda" in text
    assert "--xfails a.txt" in text and "pytest " not in text
    assert ci_main(["gpu", "--steps", "nope"]) == 1


def test_torch_build_label() -> None:
    from types import SimpleNamespace as NS

    from conformance.harness.environment import _torch_build

    def fake(ver: str, cuda: str | None, gpu: bool) -> NS:
        return NS(__version__=ver, version=NS(cuda=cuda), cuda=NS(is_available=lambda: gpu))

    assert _torch_build(fake("2.15.0+cu132", "13.2", False), "cpu") == "2.15.0+cu132 (CUDA build, no GPU: ran on CPU)"
    assert _torch_build(fake("2.13.0+cpu", None, False), "cpu") == "2.13.0+cpu (CPU build)"
    assert _torch_build(fake("2.11.0+cu128", "12.8", True), "cuda") == "2.11.0+cu128 (CUDA 12.8 build)"
    assert "GPU present: ran on CPU" in _torch_build(fake("2.11.0+cu128", "12.8", True), "cpu")


# ------------------------------------------------------------------------------------------------
# the joined matrix report


def _cell_dir(root: Path, c: mx.Cell, outcomes: dict[str, str], clone_required: bool,
              missing_probe: bool = False) -> Path:
    d = root / c.id
    d.mkdir(parents=True)
    env = {"device": "cpu", "torch_build": f"{c.torch}+cpu (CPU build)",
           "packages": {"torch": f"{c.torch}+cpu", "bitsandbytes": c.bnb, "peft": c.peft}}
    (d / "cell.json").write_text(json.dumps({"id": c.id, "torch": c.torch, "bnb": c.bnb, "device": "cpu",
                                             "files": list(c.files), "status": "ok",
                                             "installed": {"transformers": "5.23.0"}}))
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
                                                                       "peft": {"version": c.peft}},
        "clauses": {k.split(" ")[1]: {"level": "MUST"} for k in outcomes}, "results": results,
        "summary": {"implementations": summary, "exit_status": 0}}))
    if not missing_probe:
        (d / "clone.json").write_text(json.dumps({"environment": env, "cases": [{}] * 10, "verdict": {
            "clone_required": clone_required, "line": "x", "cases": 10, "required": ["a"] * (3 if clone_required else 0),
            "both_fail": []}}))
    return d


def test_matrix_report_joins_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bnb = [c for c in mx.CELLS if "bnb-axis" in c.tags]
    old = next(c for c in mx.CELLS if c.peft == "0.18.1")
    _cell_dir(tmp_path, bnb[0], {"reference FWD-A": "passed", "peft FWD-A": "failed", "peft MERGE-B": "passed"},
              clone_required=True)
    _cell_dir(tmp_path, bnb[2], {"reference FWD-A": "passed", "peft FWD-A": "passed", "peft MERGE-B": "passed"},
              clone_required=False, missing_probe=True)
    _cell_dir(tmp_path, old, {"peft FWD-A": "passed"}, clone_required=False, missing_probe=True)
    doc = join(tmp_path)
    assert list(doc["cells"]) == [bnb[0].id, old.id, bnb[2].id], "matrix order"
    assert bnb[1].id in doc["not_run"]
    rows = {(r["implementation"], r["clause"]): r for r in doc["rows"]}
    assert rows[("peft", "FWD-A")]["varies"] and not rows[("peft", "MERGE-B")]["varies"]
    assert rows[("peft", "FWD-A")]["outcomes"] == {bnb[0].id: "failed", old.id: "passed", bnb[2].id: "passed"}
    assert doc["rows"][0]["implementation"] == "reference"
    c0, c2, co = doc["cells"][bnb[0].id], doc["cells"][bnb[2].id], doc["cells"][old.id]
    assert c0["clone"]["clone_required"] is True and c0["clone"]["required"] == 3
    assert c2["clone"] is None and c2["missing"] == ["clone.json"]
    assert co["missing"] == [], "a PEFT-axis cell runs no clone probe: clone.json is not missing there"
    assert c0["installed"]["transformers"] == "5.23.0" and c0["installed"]["bitsandbytes"] == bnb[0].bnb
    md = markdown(doc)
    assert "| peft | FWD-A **Δ** | MUST | FAIL | pass | pass |" in md
    assert "**required**: 3/10 cases" in md and "not run" in md and "missing clone.json" in md
    assert f"| torch build | {bnb[0].torch}+cpu (CPU build) |" in md
    assert ci_main(["matrix_report", "--in", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "matrix.json").read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    assert (tmp_path / "matrix.md").read_text().startswith("# Conformance matrix")
    assert ci_main(["matrix_report", "--in", str(tmp_path / "nothing")]) == 1
    assert "no cell reports" in capsys.readouterr().err
    peft_axis = [c for c in mx.CELLS if "peft-axis" in c.tags]
    tagged = join(tmp_path, peft_axis)  # one axis: the bnb-only cell is left out, the other axis cells not run
    assert list(tagged["cells"]) == [c.id for c in peft_axis if c.id in (old.id, bnb[2].id)]
    assert bnb[0].id not in tagged["cells"] and bnb[0].id not in tagged["not_run"]
    assert set(tagged["not_run"]) == {c.id for c in peft_axis} - {old.id, bnb[2].id}
    assert ci_main(["matrix_report", "--in", str(tmp_path), "--tag", "peft-axis"]) == 0
    assert bnb[0].id not in (tmp_path / "matrix.md").read_text()
    assert ci_main(["matrix_report", "--in", str(tmp_path), "--tag", "no-such-tag"]) == 1


# ------------------------------------------------------------------------------------------------
# workflows


def _workflow(name: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    assert isinstance(doc, dict) and doc.get("jobs"), f"{name}: no jobs"
    assert True in doc or "on" in doc, f"{name}: no trigger"  # YAML 1.1 reads the key `on` as True
    return doc


@pytest.mark.e2e
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
    assert cpu_cells == [c.id for c in mx.CELLS if "bnb-axis" in c.tags]
    assert gpu_cells == [c.id for c in mx.CELLS if "torch-axis" in c.tags]


@pytest.mark.e2e
def test_installed_versions_asks_the_interpreter() -> None:
    from importlib.metadata import version

    from conformance.ci.interpreters import installed_versions

    got = installed_versions(sys.executable, ("pytest", "no-such-distribution-xyz"))
    assert got == {"pytest": version("pytest"), "no-such-distribution-xyz": None}


def test_staged_installs_run_in_order_and_count_in_the_digest(fake_pip: list[list[str]]) -> None:
    spec = envs.EnvSpec("staged", ("torch==1.0",), then=(("--no-deps", "litgpt==0.1"), ("--no-deps", "-e", ".")))
    envs.ensure(spec)
    assert fake_pip[1:] == [["install", "torch==1.0"], ["install", "--no-deps", "litgpt==0.1"],
                            ["install", "--no-deps", "-e", "."]]
    assert spec.digest() != envs.EnvSpec("staged", ("torch==1.0",), then=(("--no-deps", "litgpt==0.2"),)).digest()
    envs.ensure(spec)
    assert len(fake_pip) == 4, "same stages: nothing installed"


def test_litgpt_environment_pins() -> None:
    spec = impls.impl_env("litgpt")
    assert spec.path.name == "impl-litgpt" and spec.constraints == (mx.CPU_CONSTRAINTS,)
    assert spec.requirements == (f"torch=={mx.CPU_TORCH}", "bitsandbytes==0.50.2")
    assert ("--no-deps", *impls.LITGPT_PINS) in spec.then and spec.then[-1] == ("--no-deps", "-e", ".")
    assert all("==" in p for p in impls.LITGPT_PINS) and "litgpt==0.5.13" in impls.LITGPT_PINS
    with pytest.raises(CIError, match="known: litgpt"):
        impls.impl_env("nothing")


def test_compare_impls_runs_each_environment_then_joins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(impls, "OUT", tmp_path)
    monkeypatch.setattr(impls.envs, "ensure", lambda spec, fresh=False: f"/envs/{spec.name}/bin/python")

    def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
        calls.append(cmd)
        if "--report" in cmd:
            Path(cmd[cmd.index("--report") + 1]).write_text("{}")
        return 1 if "peft" in cmd else 0

    monkeypatch.setattr(impls, "run", run)
    assert impls.compare_impls(argparse.Namespace(fresh=False), ["--clauses", "FWD-*"]) == 0  # a finding is not a crash
    main = f"/envs/cpu-torch{mx.CPU_TORCH}/bin/python"
    assert calls[0][:7] == [main, "-m", "conformance", "run", "--impl", "reference", "--impl"]
    others = list(impls.IMPL_ENVS)
    assert others[:2] == ["litgpt", "adapters"], others  # each third-party library in an environment of its own
    for call, name in zip(calls[1:], others):
        assert call[:6] == [main, "-m", "conformance", "run", "--impl", f"{name}@/envs/impl-{name}/bin/python"]
    n = 1 + len(others)
    assert all(c[-2:] == ["--clauses", "FWD-*"] for c in calls[:n])
    assert calls[n][:4] == [main, "-m", "conformance", "join"]
    assert calls[n][4:4 + n] == [str(tmp_path / f"{r}.json") for r in ("main", *others)]
    assert calls[n][-4:] == ["--json", f"{tmp_path / 'comparison'}.json", "--markdown", f"{tmp_path / 'comparison'}.md"]
