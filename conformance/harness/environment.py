"""The environment's fingerprint: what a result was measured on (versions, GPU or CPU, the CPU features and
bitsandbytes' CPU code paths, git sha)."""

from __future__ import annotations

import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import conformance

PACKAGES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "hypothesis", "pytest")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    root = Path(conformance.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def source_sha() -> str:
    """sha256 (12 hex) of the suite's own Python sources, in path order.

    The git sha alone can mislead: a copy of a working tree (a CI runner's checkout of a patch, the
    device machine's copy) may carry a ``.git`` of another commit, shown as ``<sha>-dirty``. This
    hash names the code that ran whatever the ``.git`` beside it says.
    """
    import hashlib

    root = Path(conformance.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _torch_build(torch: Any, device: str) -> str:
    """``2.15.0+cu132 (CUDA build, no GPU: ran on CPU)``: what the torch build is and where it ran,
    so a CUDA wheel on a CPU machine does not read as a GPU run."""
    ver, cuda = torch.__version__, torch.version.cuda
    if not cuda:
        return f"{ver} (CPU build)"
    if not torch.cuda.is_available():
        return f"{ver} (CUDA build, no GPU: ran on CPU)"
    return f"{ver} (CUDA {cuda} build" + (", GPU present: ran on CPU)" if device != "cuda" else ")")


def _cpu_dispatch() -> dict[str, Any]:
    try:
        from conformance.quant.dispatch import cpu_dispatch
    except Exception as exc:  # noqa: BLE001 - torch/bitsandbytes missing: the fingerprint still gets written
        return {"error": f"{type(exc).__name__}: {exc}"}
    return cpu_dispatch()


def fingerprint(device: str = "cpu") -> dict[str, Any]:
    """Versions, hardware and the suite's own version: goes into every report and baseline."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "torch_build": _torch_build(torch, device),
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": __import__("os").cpu_count(),
        # the instruction-set features torch and bitsandbytes dispatch on, and whether bitsandbytes' optional
        # CPU kernel loaded (and why not): the same versions take other CPU code paths on another CPU
        "cpu_dispatch": _cpu_dispatch(),
        "suite_version": conformance.__version__,
        "suite_git_sha": git_sha(),
        "suite_source_sha256": source_sha(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["gpu"]["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["gpu"]["driver"] = None
    return env


def slug(env: dict[str, Any]) -> str:
    """A file-name-safe label for an environment: device, torch and bnb versions."""
    hw = env.get("gpu", {}).get("name") if env.get("device") == "cuda" else "cpu"
    pk = env.get("packages", {})
    raw = f"{hw}-torch{pk.get('torch')}-bnb{pk.get('bitsandbytes')}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", raw).strip("-").lower()
