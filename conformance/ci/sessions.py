"""The CPU commands: tests, report, lint, bench, compare, stateful. Each one ensures its
environment (shared where the dependencies are the same: :func:`conformance.ci.envs.cpu_env`) and
runs one tool in it. Stdlib only."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
from pathlib import Path

from . import envs
from .interpreters import gpu_visible
from .log import CIError, log
from .matrix import ROOT

BASE_ENV = {"BITSANDBYTES_NOWELCOME": "1", "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci")}
LINT_PATHS = ("conformance", "suites", "examples", "noxfile.py")
#: -q and the reasons of skips and xfails (-ra); the 25 slowest tests at the end, so a CI log shows where the time went
PYTEST_DEFAULTS = ("-q", "-ra", "-p", "no:cacheprovider", "--durations=25")


def checkout_env() -> dict[str, str]:
    """Environment variables that use the checkout in place (no install of the project itself)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**BASE_ENV, "PYTHONPATH": path}


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    log(shlex.join(cmd))
    return subprocess.run(cmd, env={**os.environ, **BASE_ENV, **(env or {})}).returncode


def names_a_path(arg: str) -> bool:
    """Is ``arg`` a test path (``suites/x.py``, ``suites/x.py::test_y``, a directory)?"""
    return not arg.startswith("-") and Path(arg.split("::")[0]).exists()


def tests(opts: argparse.Namespace, rest: list[str]) -> int:
    python = envs.ensure(envs.cpu_env(), fresh=opts.fresh)
    paths = [] if any(names_a_path(a) for a in rest) else ["suites"]
    return run([python, "-m", "pytest", *paths, *PYTEST_DEFAULTS, *rest])


def report(opts: argparse.Namespace, rest: list[str]) -> int:
    python = envs.ensure(envs.cpu_env(), fresh=opts.fresh)
    out = ROOT / "reports"
    out.mkdir(exist_ok=True)
    return run([python, "-m", "conformance", "run", "--impl", "reference", "--report", str(out / "reference.json"),
                "--markdown", str(out / "reference.md"), *rest])


def lint(opts: argparse.Namespace, rest: list[str]) -> int:
    python = envs.ensure(envs.lint_env(), fresh=opts.fresh)
    return run([python, "-m", "ruff", "check", *(opts.paths or LINT_PATHS)])


def _auto_env(fresh: bool) -> tuple[str, str]:
    """(python, device): .nox/gpu (unpinned torch) where nvidia-smi lists a GPU, else the shared CPU env."""
    ok, _ = gpu_visible()
    return (envs.ensure(envs.gpu_env(), fresh=fresh), "cuda") if ok else (envs.ensure(envs.cpu_env(), fresh=fresh),
                                                                          "cpu")


def bench(opts: argparse.Namespace, rest: list[str]) -> int:
    python, _ = _auto_env(opts.fresh)
    return run([python, "-m", "conformance.bench", *rest])


def stateful(opts: argparse.Namespace, rest: list[str]) -> int:
    python, device = _auto_env(opts.fresh)
    args = list(rest)
    if "--impl" not in args:
        args = ["--impl", "reference", *args]
    if "--device" not in args and device == "cuda":
        args += ["--device", "cuda"]
    return run([python, "-m", "conformance", "stateful", *args])


def compare(opts: argparse.Namespace, rest: list[str]) -> int:
    files = [a for a in rest if not a.startswith("-") and a.endswith(".json")]
    if len(files) < 2:
        raise CIError("usage: compare OLD.json NEW.json [--threshold 0.05] (two bench result files)")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CIError(f"compare: no such file {', '.join(missing)}")
    python = envs.ensure(envs.cpu_env(), fresh=opts.fresh)
    return run([python, "-m", "conformance.bench.compare", *rest])
