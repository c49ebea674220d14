"""What an interpreter and this machine offer, asked without importing torch here. Stdlib only.

nox (and ``python -m conformance.ci``) may run under an interpreter that has no torch: every
question about torch is asked of the target interpreter in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from .log import CIError, log
from .matrix import ROOT

_TORCH_PROBE = (
    "import json, sys\n"
    "try:\n    import torch\nexcept Exception as e:\n"
    "    print(json.dumps({'torch': None, 'error': repr(e)})); sys.exit(0)\n"
    "c = torch.cuda.is_available()\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda_build': torch.version.cuda, 'cuda': c,\n"
    "                  'device': torch.cuda.get_device_name(0) if c else None, 'executable': sys.executable}))\n"
)

_CACHE: dict[tuple[str, str], dict] = {}


def gpu_visible() -> tuple[bool, str]:
    """Cheap check that needs no torch: does ``nvidia-smi -L`` list a GPU (and CUDA_VISIBLE_DEVICES not hide it)?"""
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


def torch_info(python: str, env: dict[str, str] | None = None, fresh: bool = False) -> dict:
    """What ``python`` sees: torch version, CUDA build, whether a CUDA device is usable (cached;
    ``fresh`` after an install)."""
    key = (python, json.dumps(env or {}, sort_keys=True))
    if fresh or key not in _CACHE:
        try:
            out = subprocess.run([python, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=300,
                                 env={**os.environ, **(env or {})})
            _CACHE[key] = json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            _CACHE[key] = {"torch": None, "error": f"cannot run {python}: {exc}"}
    return _CACHE[key]


def torch_label(info: dict) -> str:
    """``torch 2.15.0+cu132 (CUDA build, no GPU: runs on CPU)``-style line for logs."""
    if not info.get("torch"):
        return f"no torch ({info.get('error')})"
    if not info.get("cuda_build"):
        return f"torch {info['torch']} (CPU build)"
    if not info.get("cuda"):
        return f"torch {info['torch']} (CUDA {info['cuda_build']} build, no GPU: runs on CPU)"
    return f"torch {info['torch']} (CUDA {info['cuda_build']} on {info.get('device')})"


def pick_interpreter(explicit: str | None, env: dict[str, str] | None = None) -> str:
    """The interpreter of an already-installed environment: ``explicit``, else the first of
    ``python``/``python3`` on PATH and this interpreter that imports torch."""
    cands = [explicit] if explicit else [shutil.which("python"), shutil.which("python3"), sys.executable]
    tried = []
    for c in dict.fromkeys(p for p in cands if p):
        info = torch_info(c, env)
        if info.get("torch"):
            log(f"using the installed environment of {c} ({torch_label(info)}); nothing is installed")
            return c
        tried.append(f"{c}: {info.get('error', 'no torch')}")
    raise CIError("no interpreter with torch found for the installed-packages mode; tried " + "; ".join(tried)
                  + ". Pass --interpreter /path/to/python (the one that has torch, bitsandbytes, peft, pytest).")


def require_cuda(python: str, env: dict[str, str] | None = None, hint: str = "", fresh: bool = False) -> dict:
    """``torch_info`` of ``python``, or CIError when it cannot use a CUDA device."""
    info = torch_info(python, env, fresh=fresh)
    if not info.get("torch"):
        raise CIError(f"{python} cannot import torch: {info.get('error')}. {hint}")
    if not info.get("cuda"):
        raise CIError(
            f"no CUDA device visible to {python}: torch {info['torch']} (CUDA build: {info.get('cuda_build')}) "
            "reports torch.cuda.is_available() == False. "
            + ("This torch is a CPU-only build. " if not info.get("cuda_build") else "") + hint)
    log(f"CUDA device: {torch_label(info)}")
    return info


def module_exists(python: str, module: str, env: dict[str, str] | None = None) -> bool:
    """Can ``python -m module`` find ``module`` (run from the checkout root)?"""
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 3)"
    try:
        return subprocess.run([python, "-c", code], env={**os.environ, **(env or {})}, capture_output=True,
                              timeout=300, cwd=ROOT).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_VERSIONS = ("import json, sys, importlib.metadata as m\n"
             "out = {}\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n        out[p] = m.version(p)\n    except m.PackageNotFoundError:\n        out[p] = None\n"
             "print(json.dumps(out))\n")


def installed_versions(python: str, packages: tuple[str, ...]) -> dict[str, str | None]:
    """Distribution versions as ``python`` sees them (None: not installed)."""
    out = subprocess.run([python, "-c", _VERSIONS, *packages], capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise CIError(f"{python} cannot list its packages: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
