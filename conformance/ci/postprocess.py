"""Reading what the steps wrote: report summaries, the clone-probe verdict. Stdlib only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def summary(report: Path) -> dict[str, dict[str, Any]]:
    """implementation -> its summary row (passed, failed, ..., must_failures) from a conformance JSON."""
    return json.loads(report.read_text(encoding="utf-8"))["summary"]["implementations"]


def summary_lines(summ: dict[str, dict[str, Any]]) -> list[str]:
    return [f"conformance {impl}: {s.get('passed')} passed, {s.get('failed')} failed, {s.get('error')} error, "
            f"{s.get('skipped')} skipped, {s.get('xfailed', 0)} xfailed; MUST failures {s.get('must_failures')}"
            for impl, s in summ.items()]


def verdict_line(clone_json: Path, device: str, baseline: Path | None) -> str | None:
    """The clone probe's one-line verdict with its baseline, or None when the probe wrote none."""
    try:
        v = json.loads(clone_json.read_text(encoding="utf-8"))["verdict"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (f"VERDICT torch {v.get('torch')} / bitsandbytes {v.get('bitsandbytes')} on {device}: {v.get('line')}\n"
            + (f"baseline: {baseline}" if baseline else "baseline: none stored for this device"))
