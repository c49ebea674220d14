"""Which stored baseline a run compares with: the newest JSON recorded on the same device. Stdlib only."""

from __future__ import annotations

import json
from pathlib import Path

from .matrix import ROOT

CLONE_PROBE_BASELINES = ROOT / "baselines" / "clone_probe"


def version_tuple(v: object) -> tuple[int, ...]:
    """``"2.13.0+cu128"`` -> ``(2, 13, 0)``; unparsable parts are dropped."""
    return tuple(int(x) for x in str(v or "").split("+")[0].split(".") if x.isdigit())


def _device_of(path: Path, doc: object) -> str | None:
    env = doc.get("environment", {}) if isinstance(doc, dict) else {}
    name = path.name.lower()
    return env.get("device") or ("cuda" if "cuda" in name else "cpu" if "cpu" in name else None)


def device_baselines(directory: Path, device: str) -> list[Path]:
    """Every JSON in ``directory`` recorded on ``device``, ordered by the torch, then the bitsandbytes, it ran on."""
    found = []
    for p in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _device_of(p, doc) == device:
            pk = (doc.get("environment", {}) if isinstance(doc, dict) else {}).get("packages", {})
            found.append((tuple(version_tuple(pk.get(k)) for k in ("torch", "bitsandbytes")), p))
    return [p for _, p in sorted(found)]


def _torch_of(path: Path) -> tuple[int, ...]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    return version_tuple(((doc.get("environment") or {}).get("packages") or {}).get("torch")) if isinstance(doc, dict) \
        else ()


def previous_baseline(directory: Path, device: str, torch: object) -> Path | None:
    """The stored baseline of ``device`` a run on ``torch`` is compared with case by case: the one of the newest torch
    not newer than ``torch`` (what changed since the release before), else the newest (:func:`newest_baseline`)."""
    target = version_tuple(torch)
    older = [p for p in device_baselines(directory, device) if target and _torch_of(p) and _torch_of(p) <= target]
    return older[-1] if older else newest_baseline(directory, device)


def newest_baseline(directory: Path, device: str) -> Path | None:
    """Newest JSON in ``directory`` recorded on ``device`` (its environment.device, else the file name).

    Newest: its ``generated_at`` if recorded, else the newest torch/bitsandbytes it ran on, else mtime."""
    best: tuple | None = None
    for p in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _device_of(p, doc) != device:
            continue
        env = doc.get("environment", {}) if isinstance(doc, dict) else {}
        pk = env.get("packages", {})
        vers = tuple(version_tuple(pk.get(k)) for k in ("torch", "bitsandbytes"))
        key = (str(doc.get("generated_at") or env.get("generated_at") or ""), vers, p.stat().st_mtime, p)
        if best is None or key[:3] > best[:3]:
            best = key
    return best[3] if best else None
