"""Figures of a benchmark result, one per question, readable at the README's size.

- ``<stem>-floor.png``: how far is each implementation's forward+backward from the measured floor
  (dequantize + ``torch.matmul``; 1.0 = as fast as that)? Grouped bars per shape, one panel per token count.
- ``<stem>-vs-peft.png``: how does each implementation compare with PEFT (time / PEFT's time; < 1 = faster)?
  Forward and forward+backward panels, grouped bars per shape and token count.
- ``<stem>-memory.png``: peak extra device memory of forward+backward at the largest token count, per shape.
- ``<stem>-dora-floor.png`` and ``<stem>-dora-vs-peft.png``: the same two questions for DoRA r=16 (NF4+DQ), when
  the result has DoRA rows (``--filter dora-``); the ratios are measured, no target is drawn from them.
- ``decode-graph-<slug>.png`` (from ``conformance.bench.decode_graph``): one-token forward against the bare
  bnb layer, eager and under CUDA-graph replay.

Error bars are the 95% confidence half-width of the median (``ci_rel``), combined in quadrature for a
ratio of two medians. Bars, not lines: neighbouring cases are unrelated shapes, not a series. The
hardware (GPU name) is in every title.

    python -m conformance.bench.plot RESULT.json [OUT_DIR]
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLORS = {"bnb": "tab:gray", "reference": "tab:blue", "reference-noclone": "tab:cyan", "peft": "tab:orange",
          "litgpt": "tab:green", "reference-v0": "tab:purple"}
MAIN_GROUP = "lora-nf4-dq"  # the QLoRA recipe: NF4 + double quant, LoRA r=16
DORA_GROUP = "dora-nf4-dq"  # the same base with DoRA r=16
#: what each group's figures say they show
GROUP_LABELS = {MAIN_GROUP: "NF4+DQ, LoRA r=16, bf16", DORA_GROUP: "NF4+DQ, DoRA r=16, bf16"}
DTYPE = "bfloat16"


def hardware(doc: dict[str, Any]) -> str:
    env = doc.get("environment", {})
    gpu = env.get("gpu")
    name = gpu.get("name") if isinstance(gpu, dict) else gpu
    hw = name if env.get("device") == "cuda" and name else (env.get("cpu") or env.get("device", "?"))
    pk = env.get("packages", {})
    return f"{hw} · torch {pk.get('torch', '?')} · bnb {pk.get('bitsandbytes', '?')}"


def _rows(doc: dict[str, Any], op: str, group: str = MAIN_GROUP, dtype: str = DTYPE) -> list[dict[str, Any]]:
    return [r for r in doc.get("results", []) if r.get("status") == "ok" and r.get("op") == op
            and r.get("dtype") == dtype and r.get("group", "").startswith(group + "/")]


def _ci(r: dict[str, Any]) -> float:
    return float(r.get("timing", {}).get("ci_rel") or 0.0)


def ratio_with_error(num: dict[str, Any], den: dict[str, Any]) -> tuple[float, float]:
    """(median ratio, its 95% half-width) of two timed records."""
    a, b = num["timing"]["median_s"], den["timing"]["median_s"]
    ratio = a / b
    return ratio, ratio * math.hypot(_ci(num), _ci(den))


def _shape_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [s for _, s in sorted({(r["in_features"] * r["out_features"], r["shape"]) for r in rows})]


def short(shape: str) -> str:
    """``4096x11008`` -> ``4k×11k`` (tick labels that do not collide)."""
    def k(v: str) -> str:
        n = int(v)
        return f"{round(n / 1024)}k" if n >= 1024 and n % 256 == 0 else v
    return "×".join(k(v) for v in shape.split("x"))


def _bars(ax: Any, labels: Sequence[str], series: dict[str, list[tuple[float, float]]], ylabel: str,
          ref: float | None = 1.0, fmt: str = "{:.2f}") -> None:
    impls = [i for i in COLORS if i in series] + sorted(set(series) - set(COLORS))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(labels))]
        ys = [v for v, _ in series[impl]]
        es = [e for _, e in series[impl]]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=impl, color=COLORS.get(impl), error_kw={"lw": 0.8})
        for x, y in zip(xs, ys):
            if y == y:  # not NaN
                ax.annotate(fmt.format(y), (x, y), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([short(label) for label in labels], fontsize=9)
    if ref is not None:
        ax.axhline(ref, color="black", lw=0.8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def floor_figure(doc: dict[str, Any], path: Path, group: str = MAIN_GROUP) -> Path | None:
    rows = _rows(doc, "fwdbwd", group)
    floors = {(r["shape"], r["tokens"]): r for r in rows if r["impl"] == "floor"}
    tokens = sorted({t for _, t in floors if t > 1})
    if not tokens:
        return None
    plt = _pyplot()
    shapes = _shape_order(rows)
    fig, axes = plt.subplots(1, len(tokens), figsize=(4.2 * len(tokens), 3.6), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], tokens):
        series: dict[str, list[tuple[float, float]]] = defaultdict(lambda: [(float("nan"), 0.0)] * len(shapes))
        for r in rows:
            f = floors.get((r["shape"], t))
            if r["tokens"] == t and f is not None and r["impl"] in ("reference", "peft", "litgpt"):
                series[r["impl"]][shapes.index(r["shape"])] = ratio_with_error(r, f)
        _bars(ax, shapes, dict(series), "time / measured floor" if ax is axes[0][0] else "")
        ax.set_title(f"{t} tokens", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"fwd+bwd over the measured floor ({GROUP_LABELS[group]}): {hardware(doc)}", fontsize=10)
    return _save(fig, path)


def vs_peft_figure(doc: dict[str, Any], path: Path, group: str = MAIN_GROUP) -> Path | None:
    ops = [op for op in ("fwd", "fwdbwd") if any(r["impl"] == "peft" for r in _rows(doc, op, group))]
    if not ops:
        return None
    plt = _pyplot()
    tokens = sorted({r["tokens"] for op in ops for r in _rows(doc, op, group)})
    fig, axes = plt.subplots(len(ops), len(tokens), figsize=(3.6 * len(tokens), 3.2 * len(ops)), squeeze=False,
                             sharey="row")
    for row, op in enumerate(ops):
        rows = _rows(doc, op, group)
        shapes = _shape_order(rows)
        peft = {(r["shape"], r["tokens"]): r for r in rows if r["impl"] == "peft"}
        for col, t in enumerate(tokens):
            ax = axes[row][col]
            series: dict[str, list[tuple[float, float]]] = {}
            for r in rows:
                key = (r["shape"], r["tokens"])
                if r["tokens"] == t and key in peft and r["impl"] in ("reference", "litgpt"):
                    series.setdefault(r["impl"], [(float("nan"), 0.0)] * len(shapes))
                    series[r["impl"]][shapes.index(r["shape"])] = ratio_with_error(r, peft[key])
            _bars(ax, shapes, series, f"{'forward' if op == 'fwd' else 'fwd+bwd'}: time / PEFT" if col == 0 else "")
            ax.set_title(f"{'forward' if op == 'fwd' else 'fwd+bwd'}, {t} token{'s' if t > 1 else ''}", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"against PEFT (< 1 = faster; {GROUP_LABELS[group]}): {hardware(doc)}", fontsize=10)
    return _save(fig, path)


def memory_figure(doc: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in _rows(doc, "fwdbwd") if r.get("memory", {}).get("extra_bytes") is not None]
    if not rows:
        return None
    plt = _pyplot()
    top = max(r["tokens"] for r in rows)
    rows = [r for r in rows if r["tokens"] == top and r["impl"] in ("bnb", "reference", "peft", "litgpt")]
    shapes = _shape_order(rows)
    series: dict[str, list[tuple[float, float]]] = defaultdict(lambda: [(float("nan"), 0.0)] * len(shapes))
    for r in rows:
        series[r["impl"]][shapes.index(r["shape"])] = (r["memory"]["extra_bytes"] / 2**20, 0.0)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    _bars(ax, shapes, dict(series), "peak extra memory (MiB)", ref=None, fmt="{:.0f}")
    ax.legend(fontsize=8)
    ax.set_title(f"peak memory above the layer's own, fwd+bwd at {top} tokens\n{hardware(doc)}", fontsize=10)
    return _save(fig, path)


def decode_figure(doc: dict[str, Any], path: Path) -> Path | None:
    recs = [r for r in doc.get("records", []) if r.get("impl") != "bnb"]
    if not recs:
        return None
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in doc["records"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
    for ax, mode in zip(axes, ("eager", "graph")):
        series: dict[str, list[tuple[float, float]]] = defaultdict(lambda: [(float("nan"), 0.0)] * len(shapes))
        for r in recs:
            v = r.get(f"{mode}_vs_bnb")
            if v is not None:
                series[r["impl"]][shapes.index(r["shape"])] = (v, 0.0)
        _bars(ax, shapes, dict(series), "time / bare bnb layer" if mode == "eager" else "")
        ax.set_title({"eager": "eager (host-bound)", "graph": "CUDA graph replay (device time)"}[mode], fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"one-token decode against the bare NF4 layer, same mode: {hardware(doc)}", fontsize=10)
    return _save(fig, path)


def plot(doc: dict[str, Any], out: str | Path) -> list[Path]:
    """Write every figure that ``doc`` has data for; ``out`` is a PNG path whose stem names them."""
    out = Path(out)
    stem = out.with_suffix("")
    if doc.get("kind") == "decode_graph":
        made = [decode_figure(doc, out)]
    else:
        made = [floor_figure(doc, Path(f"{stem}-floor.png")), vs_peft_figure(doc, Path(f"{stem}-vs-peft.png")),
                memory_figure(doc, Path(f"{stem}-memory.png")),
                floor_figure(doc, Path(f"{stem}-dora-floor.png"), DORA_GROUP),
                vs_peft_figure(doc, Path(f"{stem}-dora-vs-peft.png"), DORA_GROUP)]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    src = Path(argv[0])
    try:
        doc = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read benchmark result {src}: {exc}", file=sys.stderr)
        return 2
    dst = Path(argv[1]) / src.with_suffix(".png").name if len(argv) > 1 else src.with_suffix(".png")
    for p in plot(doc, dst):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
