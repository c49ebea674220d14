"""nox sessions: the front door. `nox -l` lists them with their descriptions.

CPU sessions pin torch==2.13.0 through constraints/cpu.txt (the local CPU build; an unpinned torch
pulls GBs of CUDA wheels). GPU sessions never pin torch. Options of a session go after ``--``
(``nox -s gpu -- --offline``); ``nox -s <session> -- --help`` does not exist, docs/nox.md lists them.

The torch x bitsandbytes matrix is defined once, in conformance/matrix.py (loaded here by path: nox
may run under an interpreter without torch or the package).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).parent
CPU_CONSTRAINTS = str(ROOT / "constraints" / "cpu.txt")
REPORTS = ROOT / "reports"
MATRIX_PY = ROOT / "conformance" / "matrix.py"
BASE_ENV = {"BITSANDBYTES_NOWELCOME": "1", "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci")}

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"


def _load_matrix():  # noqa: ANN202 - a module object
    spec = importlib.util.spec_from_file_location("_conformance_matrix", MATRIX_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


MATRIX = _load_matrix()


# ------------------------------------------------------------------------------------------------
# helpers


def _install_cpu(session: nox.Session, *extras: str) -> None:
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-c", CPU_CONSTRAINTS, "torch==2.13.0")
    session.install("-c", CPU_CONSTRAINTS, "-e", spec)


def _gpu_visible() -> tuple[bool, str]:
    """Cheap check that needs no torch: does ``nvidia-smi -L`` list a GPU?"""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "nvidia-smi not found (no NVIDIA driver on this machine)"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"nvidia-smi -L failed: {exc}"
    gpus = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")]
    if out.returncode or not gpus:
        return False, f"nvidia-smi -L lists no GPU (rc={out.returncode}): {(out.stderr or out.stdout).strip()[:200]}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return True, "; ".join(gpus)


_TORCH_PROBE = (
    "import json, sys\n"
    "try:\n    import torch\nexcept Exception as e:\n"
    "    print(json.dumps({'torch': None, 'error': repr(e)})); sys.exit(0)\n"
    "c = torch.cuda.is_available()\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda_build': torch.version.cuda, 'cuda': c,\n"
    "                  'device': torch.cuda.get_device_name(0) if c else None, 'executable': sys.executable}))\n"
)


def _torch_info(python: str, env: dict[str, str] | None = None, fresh: bool = False) -> dict:
    """What ``python`` sees: torch version, CUDA build, whether a CUDA device is usable (cached;
    ``fresh`` after an install)."""
    key = (python, json.dumps(env or {}, sort_keys=True))
    if fresh or key not in _TORCH_INFO:
        _TORCH_INFO[key] = _probe_torch(python, env)
    return _TORCH_INFO[key]


_TORCH_INFO: dict[tuple[str, str], dict] = {}


def _probe_torch(python: str, env: dict[str, str] | None) -> dict:
    try:
        out = subprocess.run([python, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **(env or {})})
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"torch": None, "error": f"cannot run {python}: {exc}"}


def _pick_interpreter(session: nox.Session, explicit: str | None, env: dict[str, str] | None = None) -> str:
    """The interpreter of the already-installed environment: --interpreter, else the first of
    `python`/`python3` on PATH and nox's own interpreter that imports torch."""
    cands = [explicit] if explicit else [shutil.which("python"), shutil.which("python3"), sys.executable]
    tried = []
    for c in dict.fromkeys(p for p in cands if p):
        info = _torch_info(c, env)
        if info.get("torch"):
            session.log(f"using the installed environment of {c} (torch {info['torch']}, CUDA build "
                        f"{info.get('cuda_build')}); nothing is installed")
            return c
        tried.append(f"{c}: {info.get('error', 'no torch')}")
    session.error("no interpreter with torch found for the installed-packages mode; tried " + "; ".join(tried)
                  + ". Pass --interpreter /path/to/python (the one that has torch, bitsandbytes, peft, pytest).")
    raise AssertionError  # unreachable: session.error raises


def _require_cuda(session: nox.Session, python: str, env: dict[str, str] | None = None, hint: str = "",
                  fresh: bool = False) -> dict:
    info = _torch_info(python, env, fresh=fresh)
    if not info.get("torch"):
        session.error(f"{python} cannot import torch: {info.get('error')}. {hint}")
    if not info.get("cuda"):
        session.error(
            f"no CUDA device visible to {python}: torch {info['torch']} (CUDA build: {info.get('cuda_build')}) "
            f"reports torch.cuda.is_available() == False. "
            + ("This torch is a CPU-only build. " if not info.get("cuda_build") else "")
            + hint)
    session.log(f"CUDA device: {info.get('device')} (torch {info['torch']}, CUDA {info.get('cuda_build')})")
    return info


def _project_requirements(*extras: str) -> list[str]:
    """Runtime (+ extras) requirements from pyproject.toml, for installs that skip the project itself."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return ["torch", "bitsandbytes", "transformers", "peft", "accelerate", "pytest", "pytest-benchmark",
                "hypothesis"]
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    for e in extras:
        reqs += proj.get("optional-dependencies", {}).get(e, [])
    return [r for r in reqs if not r.lower().startswith("nox")]


def _module_exists(python: str, module: str, env: dict[str, str]) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 3)"
    try:
        return subprocess.run([python, "-c", code], env={**os.environ, **env}, capture_output=True,
                              timeout=300, cwd=ROOT).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _newest_baseline(directory: Path, device: str) -> Path | None:
    """Newest JSON in ``directory`` recorded on ``device`` (its environment.device, else the file name)."""
    best: tuple | None = None
    for p in directory.glob("*.json") if directory.is_dir() else []:
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        env = doc.get("environment", {}) if isinstance(doc, dict) else {}
        dev = env.get("device") or ("cuda" if "cuda" in p.name.lower() else "cpu" if "cpu" in p.name.lower() else None)
        if dev != device:
            continue
        # newest: its generated_at if recorded, else the newest torch/bitsandbytes it ran on, else mtime
        pk = env.get("packages", {})
        vers = tuple(_vtuple(pk.get(k)) for k in ("torch", "bitsandbytes"))
        key = (str(doc.get("generated_at") or env.get("generated_at") or ""), vers, p.stat().st_mtime, p)
        if best is None or key[:3] > best[:3]:
            best = key
    return best[3] if best else None


def _vtuple(v: object) -> tuple[int, ...]:
    return tuple(int(x) for x in str(v or "").split("+")[0].split(".") if x.isdigit())


class _Steps:
    """Run named steps one after another; a failing or missing step does not stop the others, but
    the session fails at the end with a summary (nothing is skipped silently)."""

    def __init__(self, session: nox.Session, python: str, env: dict[str, str], outdir: Path) -> None:
        self.session, self.python, self.env, self.outdir = session, python, env, outdir
        self.rows: list[dict] = []

    def run(self, name: str, module: str, args: list[str], *, success: tuple[int, ...] = (0,),
            artefacts: tuple[str, ...] = (), needs: tuple[str, ...] = (), expect: tuple[str, ...] = ()) -> bool:
        s = self.session
        cmd = [self.python, "-m", module, *args]
        missing = [m for m in (module, *needs) if not _module_exists(self.python, m, self.env)]
        if missing:
            msg = (f"MISSING: module {', '.join(missing)} does not exist in this checkout/environment: "
                   f"step {name!r} FAILED (not skipped)")
            s.warn("=" * 100 + "\n" + msg + "\n" + "=" * 100)
            self.rows.append({"step": name, "status": "missing module", "command": shlex.join(cmd), "seconds": 0})
            return False
        s.log(f"--- step {name}: {shlex.join(cmd)}")
        t0 = time.perf_counter()
        status = "ok"
        for a in expect:  # stale outputs must not pass for this run's
            (self.outdir / a).unlink(missing_ok=True)
        try:
            s.run(*cmd, env=self.env, external=True, success_codes=list(success))
        except CommandFailed as exc:
            status = f"failed (rc={getattr(exc, 'return_code', '?')})"
        else:
            # an accepted non-zero exit (e.g. 1 = findings) must still have produced its output: a
            # crash also exits 1
            absent = [a for a in expect if not (self.outdir / a).exists()]
            if absent:
                status = f"failed (no {', '.join(absent)})"
                s.warn(f"step {name}: exited with an accepted code but wrote no {', '.join(absent)}: a crash")
        self.rows.append({"step": name, "status": status, "command": shlex.join(cmd),
                          "seconds": round(time.perf_counter() - t0, 1),
                          "artefacts": [a for a in artefacts if (self.outdir / a).exists()]})
        return status == "ok"

    def fail(self, name: str, why: str) -> None:
        self.rows.append({"step": name, "status": f"failed: {why}", "command": "", "seconds": 0})

    def finish(self, title: str) -> None:
        s = self.session
        (self.outdir / "steps.json").write_text(json.dumps(
            {"session": title, "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "steps": self.rows}, indent=1) + "\n")
        width = max(len(r["step"]) for r in self.rows) if self.rows else 4
        lines = [f"{title}: step summary (artefacts in {self.outdir})"]
        lines += [f"  {r['step']:<{width}}  {r['status']:<22} {r['seconds']:>7.1f}s" for r in self.rows]
        s.log("\n".join(lines))
        bad = [r["step"] for r in self.rows if r["status"] != "ok"]
        if bad:
            s.error(f"{len(bad)} step(s) failed: {', '.join(bad)}; artefacts in {self.outdir}")
        s.log(f"all {len(self.rows)} steps ok; artefacts in {self.outdir}")


class _OptionError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # raise, never sys.exit inside nox
        raise _OptionError(message)


def _parser(prog: str) -> argparse.ArgumentParser:
    return _Parser(prog=f"nox -s {prog} --", add_help=False)


def _parse(session: nox.Session, p: argparse.ArgumentParser) -> argparse.Namespace:
    try:
        return p.parse_args(session.posargs)
    except _OptionError as exc:
        session.error(f"{p.prog}: {exc}. {p.format_usage().strip()}")
        raise AssertionError from None  # unreachable


# ------------------------------------------------------------------------------------------------
# sessions


@nox.session
def tests(session: nox.Session) -> None:
    """CPU: the whole suite (clauses for the reference, unit tests, benchmark smoke); torch==2.13.0."""
    _install_cpu(session, "test", "plot")
    env = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci"), "BITSANDBYTES_NOWELCOME": "1"}
    session.run("pytest", "suites", "-q", "-ra", "-p", "no:cacheprovider", *session.posargs, env=env)


@nox.session
def report(session: nox.Session) -> None:
    """Main job: the conformance report for the reference implementation (reports/reference.{json,md})."""
    _install_cpu(session, "test")  # [test]: the clause modules import hypothesis (spec/checks/merge.py)
    REPORTS.mkdir(exist_ok=True)
    session.run("python", "-m", "conformance", "run", "--impl", "reference", "--report",
                str(REPORTS / "reference.json"), "--markdown", str(REPORTS / "reference.md"), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, suites, examples and this file."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "conformance", "suites", "examples", "noxfile.py")


GPU_STEPS = ("pytest", "conformance", "clone_probe", "stateful", "bench")


def _gpu_plan(out: Path, opts: argparse.Namespace) -> list[dict]:
    """The gpu session's steps: name, module run with -m, its arguments, modules it needs."""
    baseline = _newest_baseline(ROOT / "baselines" / "clone_probe", "cuda")
    conf = ["run", "--impl", "reference", "--impl", "peft", "--device", "cuda",
            "--report", str(out / "conformance.json"), "--markdown", str(out / "conformance.md")]
    for path in opts.xfails or []:
        conf += ["--xfails", path]
    probe = ["probe", "clone", "--device", "cuda", "--quiet", "--json", str(out / "clone_probe.json")]
    if baseline:
        probe += ["--compare", str(baseline)]
    # the full benchmark matrix (gpu and bench markers) is the `bench` step's job, and device-independent
    # tooling tests (cpu_only: runner isolation, nox wiring) are the CPU job's; neither runs here
    plan = [
        {"name": "pytest", "module": "pytest", "args": ["suites", "--device", "cuda", "-m", "not (gpu and bench) and not cpu_only", "-q", "-ra", "-p",
                                                         "no:cacheprovider", "--junitxml", str(out / "pytest.xml")],
         "artefacts": ("pytest.xml",)},
        # exit 1 = a MUST clause failed: for PEFT a finding (in the report); for the reference it
        # fails the job (checked from the JSON afterwards)
        {"name": "conformance", "module": "conformance", "args": conf, "success": (0, 1),
         "artefacts": ("conformance.json", "conformance.md"), "expect": ("conformance.json",)},
        {"name": "clone_probe", "module": "conformance", "args": probe, "needs": ("conformance.probe.clone",),
         "artefacts": ("clone_probe.json",), "baseline": str(baseline) if baseline else None},
        {"name": "stateful", "module": "conformance.spec.stateful",
         "args": ["--impl", "reference", "--device", "cuda", "--examples", str(opts.examples),
                  "--out", str(out / "stateful")], "artefacts": ("stateful",)},
        {"name": "bench", "module": "conformance.bench",
         "args": ["--device", "cuda", "--quick", "--out", str(out / "bench")], "artefacts": ("bench",)},
    ]
    return [st for st in plan if st["name"] in opts.steps]


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU CI job: suite on CUDA, reference+peft report, clone probe vs baseline, stateful, quick bench.

    Options after --: --offline (use the installed torch/bnb/peft, install nothing; also implied by
    `nox --no-venv`), --interpreter PY, --wheels DIR (pip --no-index --find-links DIR), --reports-dir
    DIR (default reports/gpu), --examples N (stateful, default 100), --xfails FILE, --steps a,b,...,
    --plan (print the steps and exit; needs no GPU).
    """
    p = _parser("gpu")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--interpreter", default=None)
    p.add_argument("--wheels", default=None)
    p.add_argument("--reports-dir", default=str(REPORTS / "gpu"))
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--xfails", action="append", default=None)
    p.add_argument("--steps", default=",".join(GPU_STEPS))
    p.add_argument("--plan", action="store_true")
    opts = _parse(session, p)
    opts.steps = [s.strip() for s in opts.steps.split(",") if s.strip()]
    unknown = set(opts.steps) - set(GPU_STEPS)
    if unknown:
        session.error(f"unknown --steps {sorted(unknown)}; steps: {', '.join(GPU_STEPS)}")
    out = Path(opts.reports_dir).resolve()
    plan = _gpu_plan(out, opts)
    offline = opts.offline or session.venv_backend == "none"
    env = dict(BASE_ENV)
    if offline or opts.wheels:
        # the checkout is used in place (PYTHONPATH): no install of the project itself
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if opts.plan:
        mode = "offline (installed packages)" if offline else f"wheels from {opts.wheels}" if opts.wheels else \
            "venv .nox/gpu, pip install -e .[test] (torch unpinned)"
        lines = [f"gpu plan: {mode}; artefacts -> {out}"]
        python = _pick_interpreter(session, opts.interpreter, env) if offline else sys.executable
        for st in plan:
            missing = [m for m in (st["module"], *st.get("needs", ())) if not _module_exists(python, m, env)]
            lines.append(f"  {st['name']:<12} python -m {st['module']} {shlex.join(st['args'])}"
                         + (f"\n  {'':<12} MISSING MODULE {', '.join(missing)}: this step will FAIL" if missing else ""))
            if st["name"] == "clone_probe" and not st.get("baseline"):
                lines.append(f"  {'':<12} (no CUDA baseline in baselines/clone_probe/: runs without --compare)")
        session.log("\n".join(lines))
        return
    if offline:
        python = _pick_interpreter(session, opts.interpreter, env)
        _require_cuda(session, python, env, hint="The gpu session needs a CUDA device and a CUDA build of torch.")
    else:
        venv_python = str(Path(session.bin) / "python")
        pre = _torch_info(venv_python)
        if pre.get("torch"):  # reused venv: check with the interpreter we will use, before anything else
            if not pre.get("cuda"):
                _require_cuda(session, venv_python, hint="(reused venv .nox/gpu; remove it if its torch is wrong)")
        else:
            ok, why = _gpu_visible()
            if not ok:
                session.error(f"no CUDA device visible: {why}. The gpu session needs a GPU runner; nothing was "
                              "installed. (CPU machine: use `nox -s tests`.)")
            session.log(f"GPU(s): {why}")
        if opts.wheels:
            wheels = str(Path(opts.wheels).resolve())
            session.install("--no-index", "--find-links", wheels, *_project_requirements("test"))
        else:
            session.install("-e", ".[test]")  # never pin torch here: the runner's index gives its CUDA build
        _require_cuda(session, venv_python, env, fresh=True, hint="pip installed a torch without CUDA; pass "
                      "--wheels DIR with a CUDA torch wheel, or --offline on a machine that has one.")
        python = venv_python
    out.mkdir(parents=True, exist_ok=True)
    session.log(f"artefacts go to {out}")
    run = _Steps(session, python, env, out)
    for st in plan:
        if st["name"] == "clone_probe":
            if st.get("baseline"):
                session.log(f"clone probe: comparing with the newest CUDA baseline {st['baseline']}")
            else:
                session.warn("clone probe: no CUDA baseline in baselines/clone_probe/ (a JSON whose "
                             "environment.device is 'cuda'): running WITHOUT --compare. Store this run's "
                             "clone_probe.json there to compare future runs.")
        ok = run.run(st["name"], st["module"], st["args"], success=st.get("success", (0,)),
                     artefacts=st.get("artefacts", ()), needs=st.get("needs", ()), expect=st.get("expect", ()))
        if st["name"] == "conformance" and ok:
            try:
                summ = json.loads((out / "conformance.json").read_text())["summary"]["implementations"]
            except (OSError, ValueError, KeyError) as exc:
                run.fail("conformance[reference]", f"cannot read {out / 'conformance.json'}: {exc}")
                continue
            for impl, s in summ.items():
                session.log(f"conformance {impl}: {s.get('passed')} passed, {s.get('failed')} failed, "
                            f"{s.get('error')} error, {s.get('skipped')} skipped; MUST failures {s.get('must_failures')}")
            if summ.get("reference", {}).get("must_failures", 0):
                run.fail("conformance[reference]", f"the reference fails {summ['reference']['must_failures']} "
                         "MUST clause(s) on CUDA")
    run.finish("gpu")


def _cell_params() -> list:
    return [nox.param(c.torch, c.bnb, tags=["matrix", *c.tags]) for c in MATRIX.CELLS]


_VERSIONS = ("import json, importlib.metadata as m\n"
             "out = {}\n"
             "for p in ('torch', 'bitsandbytes', 'peft', 'transformers', 'accelerate'):\n"
             "    try:\n        out[p] = m.version(p)\n    except m.PackageNotFoundError:\n        out[p] = None\n"
             "print(json.dumps(out))\n")


@nox.session
@nox.parametrize("torch,bnb", _cell_params())
def matrix(session: nox.Session, torch: str, bnb: str) -> None:
    """torch x bitsandbytes cell (table: conformance/matrix.py): reference+peft report and clone probe.

    Writes reports/matrix/<cell>/. Pick cells with -t bnb-axis (CPU) / -t torch-axis (GPU CI) / -t
    torch-2.12.0. Options after --: --device cpu|cuda (default: cpu for the CPU-torch cells, cuda
    for the others), --strict (a failing MUST clause fails the cell), --out DIR (default reports/matrix).
    """
    c = MATRIX.cell(torch, bnb)
    p = _parser("matrix")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--out", default=str(REPORTS / "matrix"))
    opts = _parse(session, p)
    device = opts.device or ("cuda" if c.needs_gpu else "cpu")
    if device == "cuda" or c.needs_gpu:
        ok, why = _gpu_visible()
        if not ok:
            session.skip(f"{c.session} is a GPU CI cell (torch {torch} from PyPI is a CUDA build; "
                         f"device {device}) and no CUDA device is visible here: {why}. It runs on the "
                         "self-hosted GPU runner (.github/workflows/gpu.yml, matrix job).")
    out = Path(opts.out).resolve() / c.id
    out.mkdir(parents=True, exist_ok=True)
    for stale in MATRIX.CELL_FILES + ("conformance.md",):
        (out / stale).unlink(missing_ok=True)
    meta = {"id": c.id, "session": c.session, "torch": torch, "bnb": bnb, "device": device,
            "companions": c.to_json()["companions"], "pins": c.pins(), "status": "installing",
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "steps": {}}

    def save() -> None:
        (out / "cell.json").write_text(json.dumps(meta, indent=1) + "\n")

    save()
    session.log(f"cell {c.id}: {' '.join(c.pins())} on {device}; reports -> {out}")
    cpu_pin = ["-c", CPU_CONSTRAINTS] if (device == "cpu" and not c.needs_gpu) else []
    # [test]: the clause modules import hypothesis (conformance/spec/checks/merge.py), so
    # `python -m conformance run` needs it even outside pytest
    session.install(*cpu_pin, *c.pins(), "-e", ".[test]")
    installed = json.loads(session.run("python", "-c", _VERSIONS, silent=True).strip().splitlines()[-1])
    meta["installed"] = installed
    got_t, got_b = (installed.get("torch") or "").split("+")[0], installed.get("bitsandbytes")
    if got_t != torch or got_b != bnb:
        meta["status"] = "wrong versions installed"
        save()
        session.error(f"asked for torch {torch} / bnb {bnb}, the venv has torch {installed.get('torch')} / "
                      f"bnb {got_b}; remove .nox/{session.name} and retry")
    python = str(Path(session.bin) / "python")
    if device == "cuda":
        _require_cuda(session, python, fresh=True, hint=f"cell {c.id} installed a torch that cannot use the GPU.")
    env = dict(BASE_ENV)
    run = _Steps(session, python, env, out)
    conf_ok = run.run("conformance", "conformance",
                      ["run", "--impl", "reference", "--impl", "peft", "--device", device,
                       "--report", str(out / "conformance.json"), "--markdown", str(out / "conformance.md")],
                      success=(0,) if opts.strict else (0, 1), artefacts=("conformance.json", "conformance.md"),
                      expect=("conformance.json",))
    meta["steps"]["conformance"] = run.rows[-1]["status"]
    run.run("clone_probe", "conformance", ["probe", "clone", "--device", device, "--quiet",
                                           "--json", str(out / "clone.json")], artefacts=("clone.json",),
            needs=("conformance.probe.clone",))
    meta["steps"]["clone_probe"] = run.rows[-1]["status"]
    meta["status"] = "ok" if all(r["status"] == "ok" for r in run.rows) else "step failed"
    if conf_ok and (out / "conformance.json").is_file():
        summ = json.loads((out / "conformance.json").read_text())["summary"]["implementations"]
        meta["must_failures"] = {k: v.get("must_failures", 0) for k, v in summ.items()}
    meta["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save()
    run.finish(c.session)


@nox.session(venv_backend="none")
def matrix_report(session: nox.Session) -> None:
    """Join reports/matrix/<cell>/ into one table (reports/matrix/matrix.{json,md}); --save NAME copies it to baselines/matrix/."""
    p = _parser("matrix_report")
    p.add_argument("--in", dest="root", default=str(REPORTS / "matrix"))
    p.add_argument("--save", default=None, metavar="NAME")
    opts = _parse(session, p)
    root = Path(opts.root)
    js, md = root / "matrix.json", root / "matrix.md"
    # -I: the module is stdlib-only and must not see the package directory as sys.path[0]
    session.run(sys.executable, "-I", str(MATRIX_PY), "report", "--in", str(root), "--json", str(js),
                "--markdown", str(md), external=True)
    if opts.save:
        dest = ROOT / "baselines" / "matrix"
        dest.mkdir(parents=True, exist_ok=True)
        for src in (js, md):
            shutil.copyfile(src, dest / f"{opts.save}{src.suffix}")
        session.log(f"saved {dest / opts.save}.json and .md")


@nox.session
def regress(session: nox.Session) -> None:
    """Is the clone still needed on this PyTorch? Clone probe + BACKPROP-* clauses vs the stored baseline.

    Options after --: --torch VERSION (install that torch, with the companions of conformance/matrix.py
    if listed; without it the installed torch of --interpreter / PATH is used, nothing installed),
    --device cpu|cuda (default: cuda if usable), --index-url URL (for the torch install),
    --baseline FILE (default: newest baselines/clone_probe/*.json of the device), --out DIR.
    """
    p = _parser("regress")
    p.add_argument("--torch", default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--interpreter", default=None)
    p.add_argument("--index-url", default=None)
    p.add_argument("--baseline", default=None)
    p.add_argument("--out", default=str(REPORTS / "regress"))
    opts = _parse(session, p)
    env = dict(BASE_ENV)
    if opts.torch:
        gpu_ok, _ = _gpu_visible()
        comp = MATRIX.COMPANIONS.get(opts.torch)
        pins = [f"torch=={opts.torch}"]
        if comp:
            pins += [f"peft=={comp.peft}", f"transformers=={comp.transformers}", f"accelerate=={comp.accelerate}"]
        else:
            session.log(f"torch {opts.torch} has no companions row in conformance/matrix.py: newest peft/"
                        "transformers/bitsandbytes that pip resolves")
        if opts.torch == MATRIX.CPU_TORCH and not gpu_ok:
            pins = ["-c", CPU_CONSTRAINTS, *pins]
        elif not gpu_ok and not opts.index_url:
            session.warn(f"no GPU here: torch {opts.torch} from PyPI is a CUDA build (large download); "
                         "pass --index-url https://download.pytorch.org/whl/cpu for the CPU build")
        extra = ["--extra-index-url", opts.index_url] if opts.index_url else []
        session.install(*extra, *pins, "-e", ".[test]")
        python = str(Path(session.bin) / "python")
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        python = _pick_interpreter(session, opts.interpreter, env)
    info = _torch_info(python, env)
    device = opts.device or ("cuda" if info.get("cuda") else "cpu")
    if device == "cuda":
        _require_cuda(session, python, env)
    out = Path(opts.out).resolve() / f"{device}-torch{info.get('torch')}"
    out.mkdir(parents=True, exist_ok=True)
    baseline = Path(opts.baseline) if opts.baseline else _newest_baseline(ROOT / "baselines" / "clone_probe", device)
    run = _Steps(session, python, env, out)
    probe = ["probe", "clone", "--device", device, "--quiet", "--json", str(out / "clone.json")]
    if baseline:
        probe += ["--compare", str(baseline)]
    else:
        session.warn(f"no stored {device} clone-probe baseline in baselines/clone_probe/: verdict without comparison")
    run.run("clone_probe", "conformance", probe, artefacts=("clone.json",), needs=("conformance.probe.clone",))
    run.run("backprop_clauses", "conformance",
            ["run", "--impl", "reference", "--impl", "peft", "--device", device, "--clauses", "BACKPROP-*",
             "--report", str(out / "backprop.json"), "--markdown", str(out / "backprop.md")],
            success=(0, 1), artefacts=("backprop.json", "backprop.md"), expect=("backprop.json",))
    try:
        v = json.loads((out / "clone.json").read_text())["verdict"]
        bar = "=" * 100
        session.log(f"\n{bar}\nVERDICT torch {v.get('torch')} / bitsandbytes {v.get('bitsandbytes')} on {device}: "
                    f"{v.get('line')}\n"
                    + (f"baseline: {baseline}" if baseline else "baseline: none stored for this device")
                    + f"\n{bar}")
    except (OSError, ValueError, KeyError):
        session.warn("no clone-probe verdict (the probe step failed)")
    run.finish("regress")


def _install_auto(session: nox.Session, *extras: str) -> str:
    """CPU: pinned torch (constraints/cpu.txt). A GPU machine: unpinned (the runner's CUDA torch)."""
    ok, _ = _gpu_visible()
    if ok:
        session.install("-e", f".[{','.join(extras)}]" if extras else ".")
        return "cuda"
    _install_cpu(session, *extras)
    return "cpu"


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: python -m conformance.bench (args after --, e.g. --quick --out reports/bench; default out baselines/bench)."""
    _install_auto(session, "plot")
    session.run("python", "-m", "conformance.bench", *session.posargs, env=BASE_ENV)


@nox.session
def compare(session: nox.Session) -> None:
    """Bench regression compare: nox -s compare -- OLD.json NEW.json (noise-aware; exit 1 on a regression)."""
    if not session.posargs:
        session.error("usage: nox -s compare -- OLD.json NEW.json [--threshold 0.05] (bench result files)")
    _install_cpu(session)
    session.run("python", "-m", "conformance.bench.compare", *session.posargs, env=BASE_ENV)


@nox.session
def stateful(session: nox.Session) -> None:
    """Stateful machine (merge/unmerge/adapter sequences): nox -s stateful -- --examples N [--impl peft] [--device cuda]."""
    device = _install_auto(session, "test")
    args = list(session.posargs)
    if "--impl" not in args:
        args = ["--impl", "reference", *args]
    if "--device" not in args and device == "cuda":
        args += ["--device", "cuda"]
    session.run("python", "-m", "conformance.spec.stateful", *args, env=BASE_ENV)
