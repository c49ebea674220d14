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
