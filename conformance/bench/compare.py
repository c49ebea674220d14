"""Noise-aware regression compare of benchmark results (ours or pytest-benchmark's JSON).

A case regresses when its median got slower by more than ``threshold`` (default 5%) **and** the change
is larger than the noise: ``new - old > z * sqrt(se_old^2 + se_new^2)``, where ``se`` is the standard
error of a median estimated from the interquartile range of its rounds (``timing.median_se``), or, when
several runs are given per side, at least the standard error of the run-to-run medians. The median of
repeated runs is compared (one file per run; several files per side are pooled by their medians).

    python -m conformance.bench.compare OLD.json NEW.json [--threshold 0.05] [--z 3] [--filter reference]
    python -m conformance.bench.compare --old a.json --old b.json --new c.json --new d.json
    python -m conformance.bench.compare OLD.json NEW.json --normalize bnb   # relative to the bare layer

``--normalize IMPL`` divides each case by the same group's IMPL from the same run, which cancels
machine-speed drift between runs (a loaded shared CI box); it cannot see a slowdown of IMPL itself.

Exit status: 0 when nothing regressed, 1 on a regression, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .timing import median_se


@dataclass(frozen=True)
class Stat:
    """One case's timing in one run: median, IQR and rounds (seconds)."""

    median: float
    iqr: float = 0.0
    rounds: int = 0

    @property
    def se(self) -> float:
        return median_se(self.median, self.iqr, self.rounds) if self.rounds > 1 else 0.0


@dataclass(frozen=True)
class Pooled:
    median: float
    se: float
    runs: int


@dataclass(frozen=True)
class Verdict:
    key: str
    old: float
    new: float
    ratio: float
    noise: float  # the change needed to be significant (seconds)
    status: str  # regression | improvement | same | noisy | new | missing

    @property
    def change(self) -> float:
        return self.ratio - 1.0


def load_stats(data: dict[str, Any]) -> dict[str, Stat]:
    """Per-case stats from a conformance-bench result or a pytest-benchmark JSON document."""
    out: dict[str, Stat] = {}
    if "benchmarks" in data:  # pytest-benchmark
        for b in data["benchmarks"]:
            s = b["stats"]
            key = b.get("extra_info", {}).get("key") or b.get("fullname") or b["name"]
            out[key] = Stat(float(s["median"]), float(s.get("iqr", 0.0)), int(s.get("rounds", 0)))
        return out
    if "results" in data:
        for r in data["results"]:
            t = r.get("timing")
            if r.get("status", "ok") == "ok" and t:
                out[r["key"]] = Stat(float(t["median_s"]), float(t.get("iqr_s", 0.0)), int(t.get("rounds", 0)))
        return out
    raise ValueError("not a benchmark result: expected 'results' (conformance-bench) or 'benchmarks' (pytest-benchmark)")


def normalize(stats: dict[str, Stat], control: str) -> dict[str, Stat]:
    """Each case relative to the ``control`` implementation of its group in the same run.

    Keys are ``group/impl``; a case becomes ``median / median(group/control)``, its IQR scaled so that
    the relative noise of both adds (in quadrature). Machine-speed drift between runs (other jobs on a
    shared runner, clocks) cancels; a change in one implementation does not. Groups without the
    control are dropped, and so is the control itself (always 1).
    """
    out = {}
    for key, st in stats.items():
        group, _, impl = key.rpartition("/")
        ctl = stats.get(f"{group}/{control}")
        if ctl is None or impl == control or ctl.median <= 0:
            continue
        ratio = st.median / ctl.median
        rel = math.hypot(st.iqr / st.median if st.median else 0.0, ctl.iqr / ctl.median)
        out[key] = Stat(ratio, ratio * rel, min(st.rounds, ctl.rounds) if st.rounds and ctl.rounds else 0)
    return out


def pool(runs: list[Stat]) -> Pooled:
    """Median of the runs' medians; its noise is the larger of within-run and between-run error."""
    meds = [s.median for s in runs]
    med = statistics.median(meds)
    within = statistics.median([s.se for s in runs]) / math.sqrt(len(runs))
    between = statistics.stdev(meds) / math.sqrt(len(meds)) if len(meds) > 1 else 0.0
    return Pooled(med, max(within, between), len(runs))


def compare(old_runs: list[dict[str, Stat]], new_runs: list[dict[str, Stat]], threshold: float = 0.05,
            z: float = 3.0, key_filter: str | None = None) -> list[Verdict]:
    """Verdict per case present on either side."""
    keys = sorted(set().union(*old_runs, *new_runs))
    if key_filter:
        keys = [k for k in keys if key_filter in k]
    out = []
    for key in keys:
        o = [r[key] for r in old_runs if key in r]
        n = [r[key] for r in new_runs if key in r]
        if not o or not n:
            out.append(Verdict(key, o[0].median if o else math.nan, n[0].median if n else math.nan,
                               math.nan, 0.0, "new" if n else "missing"))
            continue
        po, pn = pool(o), pool(n)
        ratio = pn.median / po.median if po.median > 0 else math.inf
        noise = z * math.hypot(po.se, pn.se)
        diff = pn.median - po.median
        if abs(ratio - 1) <= threshold:
            status = "same"
        elif abs(diff) <= noise:
            status = "noisy"  # beyond the threshold, but not beyond the measured noise
        else:
            status = "regression" if diff > 0 else "improvement"
        out.append(Verdict(key, po.median, pn.median, ratio, noise, status))
    return out


def regressions(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.status == "regression"]


def format_table(verdicts: list[Verdict], only_changes: bool = False, unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1.0
    lines = [f"{'case':72s} {'old ' + unit:>11s} {'new ' + unit:>11s} {'change':>8s} {'noise':>8s}  status"]
    for v in verdicts:
        if only_changes and v.status == "same":
            continue
        noise_pct = 100 * v.noise / v.old if v.old == v.old and v.old > 0 else math.nan
        lines.append(f"{v.key[:72]:72s} {v.old * scale:11.4f} {v.new * scale:11.4f} {100 * v.change:+7.1f}% "
                     f"{noise_pct:7.1f}%  {v.status}")
    return "\n".join(lines)


def _read(path: str) -> dict[str, Stat]:
    return load_stats(json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="OLD.json NEW.json")
    p.add_argument("--old", action="append", default=[], help="baseline run(s); repeat for several runs")
    p.add_argument("--new", action="append", default=[], help="candidate run(s); repeat for several runs")
    p.add_argument("--threshold", type=float, default=0.05, help="relative slowdown of the median that fails (0.05)")
    p.add_argument("--z", type=float, default=3.0, help="how many standard errors a change must exceed (3)")
    p.add_argument("--filter", default=None, help="only cases whose key contains this")
    p.add_argument("--all", action="store_true", help="print unchanged cases too")
    p.add_argument("--normalize", default=None, metavar="IMPL",
                   help="compare each case relative to this implementation of its group in the same run (e.g. bnb)")
    args = p.parse_args(argv)
    old, new = list(args.old), list(args.new)
    if args.files:
        if len(args.files) != 2 or old or new:
            p.error("give OLD.json NEW.json, or --old/--new")
        old, new = [args.files[0]], [args.files[1]]
    if not old or not new:
        p.error("need at least one old and one new result file")
    try:
        olds, news = [_read(f) for f in old], [_read(f) for f in new]
        if args.normalize:
            olds = [normalize(r, args.normalize) for r in olds]
            news = [normalize(r, args.normalize) for r in news]
        verdicts = compare(olds, news, args.threshold, args.z, args.filter)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(format_table(verdicts, only_changes=not args.all, unit="x" if args.normalize else "ms"))
    bad = regressions(verdicts)
    counts = {s: sum(v.status == s for v in verdicts) for s in ("same", "noisy", "improvement", "regression")}
    print(f"\n{len(verdicts)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" (threshold {args.threshold:.0%}, z={args.z})")
    if bad:
        print(f"REGRESSION in {len(bad)} case(s): " + ", ".join(v.key for v in bad[:10]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
