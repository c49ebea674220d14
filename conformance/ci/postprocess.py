"""Reading what the steps wrote: report summaries, the clone-probe verdict. Stdlib only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.outcome import OUTCOMES
from ..core.report import load_report


def summary(report: Path) -> dict[str, dict[str, Any]]:
    """implementation -> its summary row (passed, failed, ..., must_failures) from a conformance JSON (read by
    ``conformance.core.report.load_report``: ``ReportError``, a ValueError, when it cannot be)."""
    return load_report(report).summary["implementations"]


def summary_lines(summ: dict[str, dict[str, Any]]) -> list[str]:
    """One line per implementation: every outcome's count (``conformance.core.outcome.OUTCOMES``), then the MUST
    failures (the summary's own count: the same rule as the exit status)."""
    return [f"conformance {impl}: " + ", ".join(f"{s.get(o.value, 0)} {o.value}" for o in OUTCOMES)
            + f"; MUST failures {s.get('must_failures')}" for impl, s in summ.items()]


def verdict_line(clone_json: Path, device: str, baseline: Path | None, others: Sequence[Path] = ()) -> str | None:
    """The clone probe's verdict and, in the same banner, how it compares with the stored baseline and with each of
    ``others`` (the other stored baselines of the device, one line each; None when the probe wrote no verdict)."""
    try:
        doc = json.loads(clone_json.read_text(encoding="utf-8"))
        v = doc["verdict"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    head = f"VERDICT torch {v.get('torch')} / bitsandbytes {v.get('bitsandbytes')} on {device}: {v.get('line')}"
    if not baseline:
        return head + "\nbaseline: none stored for this device"
    now = {c["id"]: bool(c.get("clone_required")) for c in doc.get("cases", [])}
    same = Path(baseline).resolve()
    return "\n".join([head, *(_vs(now, Path(b)) for b in (baseline, *(o for o in others if Path(o).resolve() != same)))])


def _vs(now: dict[str, bool], baseline: Path) -> str:
    try:
        old = json.loads(baseline.read_text(encoding="utf-8"))
        ov = old["verdict"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"baseline: {baseline} (unreadable: {exc})"
    was = {c["id"]: bool(c.get("clone_required")) for c in old.get("cases", [])}
    n_new, n_old = sum(now.values()), sum(was.values())
    shared = now.keys() & was.keys()
    no_longer = sum(1 for k in shared if was[k] and not now[k])
    newly = sum(1 for k in shared if now[k] and not was[k])
    return (f"vs baseline torch {ov.get('torch')} / bitsandbytes {ov.get('bitsandbytes')} ({baseline}): "
            f"clone required for {n_old} -> {n_new} cases; {no_longer} no longer need it, {newly} newly need it "
            f"({len(shared)} cases compared)")
