"""PNG of a benchmark result: time and fraction of the floor per shape, token count and implementation.

One row per (method, quantization, dtype) group that has run cases, columns: forward time, forward+backward
time, forward+backward as a fraction of the measured floor (1.0 = as fast as dequantize + torch.matmul),
and of the datasheet peak floor where the GPU is known.

    python -m conformance.bench.plot RESULT.json [OUT.png]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COLORS = {"bnb": "tab:gray", "floor-bare": "black", "floor": "black", "reference": "tab:blue",
          "reference-noclone": "tab:cyan", "reference-v0": "tab:purple", "peft": "tab:orange"}
STYLES = {"floor-bare": ":", "floor": "--"}


def _series(rows: list[dict[str, Any]], op: str, value: str) -> tuple[list[str], dict[str, list[float]]]:
    ok = [r for r in rows if r.get("status") == "ok" and r["op"] == op]
    xs = sorted({(r["in_features"] * r["out_features"], r["shape"], r["tokens"]) for r in ok})
    labels = [f"{s}\nt{t}" for _, s, t in xs]
    index = {(s, t): i for i, (_, s, t) in enumerate(xs)}
    series: dict[str, list[float]] = defaultdict(lambda: [float("nan")] * len(xs))
    for r in ok:
        v = r.get(value) if value != "median_ms" else r["timing"]["median_s"] * 1e3
        if v is not None:
            series[r["impl"]][index[(r["shape"], r["tokens"])]] = v
    return labels, dict(series)


def plot(doc: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        if r.get("op") in ("fwd", "fwdbwd"):
            g = r["group"].split("/")
            groups[f"{g[0]} {g[-1]}"].append(r)
    has_peak = any("frac_peak_floor" in r for r in doc["results"])
    cols = [("fwd", "median_ms", "forward time (ms)"), ("fwdbwd", "median_ms", "forward+backward time (ms)"),
            ("fwdbwd", "frac_measured_floor", "fwd+bwd: fraction of measured floor")]
    if has_peak:
        cols.append(("fwdbwd", "frac_peak_floor", "fwd+bwd: fraction of peak floor"))
    names = sorted(groups) or ["(no results)"]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(6 * len(cols), 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, (op, value, title) in enumerate(cols):
            ax = axes[row][col]
            labels, series = _series(groups.get(name, []), op, value)
            for impl, ys in sorted(series.items()):
                ax.plot(range(len(ys)), ys, marker="o", ms=3, lw=1, label=impl, color=COLORS.get(impl),
                        ls=STYLES.get(impl, "-"))
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=6, rotation=90)
            if value == "median_ms":
                ax.set_yscale("log")
            else:
                ax.axhline(1.0, color="black", lw=0.5)
                ax.set_ylim(0, 1.3)
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=6)
    env = doc.get("environment", {})
    hw = env.get("gpu", {}).get("name") if env.get("device") == "cuda" else env.get("cpu")
    fig.suptitle(f"conformance bench: {hw}, torch {env.get('packages', {}).get('torch')}, "
                 f"bnb {env.get('packages', {}).get('bitsandbytes')}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=60)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    print(plot(json.loads(src.read_text()), dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
