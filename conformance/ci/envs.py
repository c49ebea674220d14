"""Environments of the CI commands: created once under ``.nox/``, reused while their pins stand.

Each environment is a venv with a stamp file (``.conformance-env.json``) holding the hash of what
was installed into it: the pip arguments, the constraint files' text, the project's ``[project]``
table and the base interpreter. A run whose hash matches installs nothing; a changed pin installs
again into the same venv. So ``tests``, ``report``, ``bench``, ``compare`` and ``stateful`` share one
CPU environment (``.nox/cpu-torch<pin>``), and each matrix cell keeps its own across runs.

pip runs without ``-q``; while it prints nothing (a long download or unpack) a heartbeat line says
how long it has been going, every :data:`HEARTBEAT_S` seconds. Stdlib only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .log import CIError, log
from .matrix import CPU_CONSTRAINTS, CPU_TORCH, ROOT

ENV_ROOT = ROOT / ".nox"
STAMP = ".conformance-env.json"
HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class EnvSpec:
    """What one environment holds: ``requirements`` (pip arguments: pins, ``-e .[extras]``),
    ``constraints`` (files passed with ``-c``), ``pip_options`` (``--extra-index-url`` etc.);
    ``then``: further ``pip install`` argument lists run after the first, in order (e.g. a
    ``--no-deps`` install of pins whose declared dependencies conflict with the environment's)."""

    name: str
    requirements: tuple[str, ...]
    constraints: tuple[Path, ...] = ()
    pip_options: tuple[str, ...] = ()
    base_python: str = field(default_factory=lambda: sys.executable)
    then: tuple[tuple[str, ...], ...] = ()

    @property
    def path(self) -> Path:
        return ENV_ROOT / self.name

    @property
    def python(self) -> str:
        return str(self.path / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))

    def pip_args(self) -> list[str]:
        out = list(self.pip_options)
        for c in self.constraints:
            out += ["-c", str(c)]
        return out + list(self.requirements)

    def digest(self) -> str:
        h = hashlib.sha256()
        # the real interpreter, not the spelling: nox runs venv/bin/python3, a shell venv/bin/python
        later = [a for step in self.then for a in ("--then", *step)]
        editable = any(r.startswith((".", "-e")) for r in (*self.requirements, *later))
        for part in (os.path.realpath(self.base_python), *self.pip_args(), *later,
                     *(c.read_text(encoding="utf-8") for c in self.constraints), project_table() if editable else ""):
            h.update(part.encode() + b"\0")
        return h.hexdigest()[:16]


def project_table() -> str:
    """The ``[project]`` table of pyproject.toml as text (dependencies and extras live there)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r"^\[project\]$(.*?)(?=^\[tool\.)", text, re.M | re.S)
    return m.group(1) if m else text


#: the extras of the one shared CPU environment: tests need [test,plot], report and stateful [test],
#: bench [plot], compare none; one superset installed once beats a torch install per session
CPU_EXTRAS = "plot,test"


def cpu_env() -> EnvSpec:
    """The shared CPU environment: the project (editable, ``[plot,test]``) on the torch of constraints/cpu.txt."""
    return EnvSpec(f"cpu-torch{CPU_TORCH}", ("-e", f".[{CPU_EXTRAS}]"), (CPU_CONSTRAINTS,))


def gpu_env(wheels: str | None = None) -> EnvSpec:
    """The GPU environment (``.nox/gpu``): torch never pinned, so the index gives its CUDA build.

    ``wheels``: install the requirements from that wheel directory only (``--no-index``); the
    checkout is then used in place through PYTHONPATH, not installed."""
    if wheels:
        return EnvSpec("gpu-wheels", tuple(project_requirements("test", "plot")),
                       pip_options=("--no-index", "--find-links", str(Path(wheels).resolve())))
    return EnvSpec("gpu", ("-e", f".[{CPU_EXTRAS}]"))


def project_requirements(*extras: str) -> list[str]:
    """Runtime (+ extras) requirements from pyproject.toml, for installs that skip the project itself."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise CIError("--wheels needs Python >= 3.11 (tomllib) to read pyproject.toml") from None
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(proj["dependencies"])
    for e in extras:
        reqs += proj.get("optional-dependencies", {}).get(e, [])
    return list(dict.fromkeys(r for r in reqs if not r.lower().startswith("nox")))


def lint_env() -> EnvSpec:
    return EnvSpec("lint", ("ruff>=0.5",))


def ensure(spec: EnvSpec, *, fresh: bool = False) -> str:
    """Create or reuse ``spec``'s venv; install only when its stamp's hash differs. Returns its python."""
    path, stamp = spec.path, spec.path / STAMP
    if fresh and path.exists():
        log(f"--fresh: removing {path}")
        shutil.rmtree(path)
    digest = spec.digest()
    old = _read_stamp(stamp)
    if old.get("digest") == digest and Path(spec.python).exists():
        log(f"reusing {_rel(path)} (installed {old.get('installed_at')}, same pins): nothing to install")
        return spec.python
    if not Path(spec.python).exists():
        _create(spec)
    elif old:
        log(f"{_rel(path)}: pins changed since {old.get('installed_at')}; installing into the same venv")
    stamp.unlink(missing_ok=True)  # an interrupted install must not pass as done
    t0 = time.perf_counter()
    pip(spec.python, ["install", *spec.pip_args()], label=spec.name)
    for step in spec.then:
        pip(spec.python, ["install", *step], label=spec.name)
    seconds = round(time.perf_counter() - t0, 1)
    stamp.write_text(json.dumps({"digest": digest, "pip_args": spec.pip_args(), "install_seconds": seconds,
                                 "installed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
                                indent=1) + "\n")
    log(f"{_rel(path)}: installed in {seconds:.0f} s")
    return spec.python


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def _read_stamp(stamp: Path) -> dict:
    try:
        doc = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _create(spec: EnvSpec) -> None:
    log(f"creating {_rel(spec.path)} with {spec.base_python}")
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([spec.base_python, "-m", "venv", "--clear", str(spec.path)], capture_output=True, text=True)
    if out.returncode:  # e.g. Debian's python without ensurepip: nox's own dependency virtualenv works
        alt = subprocess.run([spec.base_python, "-m", "virtualenv", "--clear", str(spec.path)], capture_output=True,
                             text=True)
        if alt.returncode:
            raise CIError(f"cannot create a venv at {spec.path}: venv: {out.stderr.strip()[-300:]}; "
                          f"virtualenv: {alt.stderr.strip()[-300:]}")


def pip(python: str, args: list[str], *, label: str, heartbeat_s: float = HEARTBEAT_S) -> None:
    """``python -m pip *args`` with its output streamed and a heartbeat while it is quiet; CIError on failure."""
    cmd = [python, "-m", "pip", *args]
    log(f"{label}: {shlex.join(cmd)}")
    # no PYTHONPATH: packages on it would count as installed in the new environment
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rc = stream(cmd, label=f"pip install ({label})", heartbeat_s=heartbeat_s,
                env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if rc:
        raise CIError(f"pip install for {label} failed (rc={rc}); the environment is left without a stamp, "
                      "so the next run installs again")


def stream(cmd: list[str], *, label: str, heartbeat_s: float, env: dict[str, str] | None = None) -> int:
    """Run ``cmd``, copy its output line by line, and log ``<label>: still running, N s`` whenever it
    has been quiet for ``heartbeat_s`` seconds. Returns the exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            cwd=ROOT, stdin=subprocess.DEVNULL)
    last = [time.monotonic()]

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            last[0] = time.monotonic()
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    t0 = time.monotonic()
    while True:
        try:
            rc = proc.wait(timeout=min(heartbeat_s, 5.0))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - last[0] >= heartbeat_s:
                log(f"{label}: still running, {time.monotonic() - t0:.0f} s so far")
                last[0] = time.monotonic()
    reader.join(timeout=10)
    return rc
