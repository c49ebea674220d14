"""Text summaries of a benchmark result: the main table and the speed targets.

Targets: 4-bit LoRA r=16 forward+backward with a frozen base at training shapes (4096 and 16384
tokens): reference <= 1.15x the measured floor and never slower than PEFT in the same run; at decode
(1 token) the reference forward <= 2x the bare bnb layer.

DoRA has no target: the reference's time over PEFT's and each one's distance from DoRA's measured floor are
reported (:func:`dora_ratios`), never checked.
"""

from __future__ import annotations

from typing import Any

from .cases import TRAINING_TOKENS
from .plot import ratio_with_error

FLOOR_TARGET = 1.15
DECODE_TARGET = 2.0


def _ok(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r.get("status") == "ok"]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per checked case: the figure, the target, and whether it was met."""
    rows = []
    for r in _ok(doc):
        if r["impl"] != "reference" or r["method"] != "lora" or r["bits"] != 4:
            continue
        if r["op"] == "fwdbwd" and (r["tokens"] in TRAINING_TOKENS or doc["config"].get("quick")):
            if "x_measured_floor" in r:
                rows.append({"key": r["key"], "what": "x measured floor", "value": r["x_measured_floor"],
                             "target": FLOOR_TARGET, "met": r["x_measured_floor"] <= FLOOR_TARGET})
            if "x_peft" in r:
                rows.append({"key": r["key"], "what": "x PEFT", "value": r["x_peft"], "target": 1.0,
                             "met": r["x_peft"] <= 1.0})
        if r["op"] == "fwd" and r["tokens"] == 1 and "x_bnb" in r:
            rows.append({"key": r["key"], "what": "x bare bnb (device)", "value": r["x_bnb"],
                         "target": DECODE_TARGET, "met": r["x_bnb"] <= DECODE_TARGET})
            if "x_bnb_host" in r:
                rows.append({"key": r["key"], "what": "x bare bnb (host)", "value": r["x_bnb_host"],
                             "target": DECODE_TARGET, "met": r["x_bnb_host"] <= DECODE_TARGET})
    return rows


def dora_ratios(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per DoRA group timed for both the reference and PEFT: reference time / PEFT time with its 95%
    half-width (the two medians' relative half-widths in quadrature), and each one's time over the measured floor.
    Measured and reported only: no target."""
    ok = {r["key"]: r for r in _ok(doc)}
    rows = []
    for r in ok.values():
        if r["method"] != "dora" or r["impl"] != "reference":
            continue
        peft = ok.get(f"{r['group']}/peft")
        if peft is None:
            continue
        ratio, ci = ratio_with_error(r, peft)
        rows.append({"group": r["group"], "reference_ms": 1e3 * r["timing"]["median_s"],
                     "peft_ms": 1e3 * peft["timing"]["median_s"], "x_peft": ratio, "x_peft_ci": ci,
                     "reference_x_floor": r.get("x_measured_floor"), "peft_x_floor": peft.get("x_measured_floor")})
    return sorted(rows, key=lambda row: row["group"])


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def summary_table(doc: dict[str, Any], impls: tuple[str, ...] = ("bnb", "floor-bare", "floor", "reference",
                                                                  "reference-noclone", "reference-v0",
                                                                  "reference-v0-noclone", "peft")) -> str:
    ok = _ok(doc)
    lines = [f"{'group':48s} {'impl':18s} {'median ms':>10s} {'ci%':>5s} {'xfloor':>7s} {'%peak':>6s} "
             f"{'TFLOP/s':>8s} {'GB/s':>7s} {'extra MiB':>9s} {'clone%':>7s} {'xPEFT':>6s}"]
    for r in sorted(ok, key=lambda r: (r["group"], impls.index(r["impl"]) if r["impl"] in impls else 99)):
        if r["impl"] not in impls:
            continue
        t = r["timing"]
        mem = (r.get("memory") or {}).get("extra_bytes")
        lines.append(
            f"{r['group'][:48]:48s} {r['impl']:18s} {t['median_s'] * 1e3:10.4f} {100 * t['ci_rel']:5.1f} "
            f"{_fmt(r.get('x_measured_floor'), '7.3f'):>7s} "
            f"{_fmt(None if r.get('frac_peak_floor') is None else 100 * r['frac_peak_floor'], '6.1f'):>6s} "
            f"{_fmt(r.get('tflops'), '8.1f'):>8s} {_fmt(r.get('gbps'), '7.0f'):>7s} "
            f"{_fmt(None if mem is None else mem / 2**20, '9.1f'):>9s} {_fmt(r.get('clone_overhead_pct'), '7.1f'):>7s} "
            f"{_fmt(r.get('x_peft'), '6.3f'):>6s}")
    errors = [r for r in doc["results"] if r.get("status") == "error"]
    skipped = [r for r in doc["results"] if r.get("status") == "skipped"]
    lines.append(f"\n{len(ok)} ok, {len(errors)} errors, {len(skipped)} skipped")
    for r in errors[:10]:
        lines.append(f"  ERROR {r['key']}: {r['error'][:160]}")
    for s in doc.get("repeat_spread", []):
        lines.append(f"  repeat spread {s['key']}: {100 * s['spread_rel']:.2f}% over {len(s['medians_s'])} runs")
    for m in doc.get("memory", []):
        lines.append(f"  memory {m['shape']} {m['quant_type']}{'-dq' if m['double_quant'] else ''}: "
                     f"{m['bytes_per_param']:.4f} B/param = {m['bits_per_param']:.3f} bit "
                     f"(stats {m['stats_bits_per_param']:.3f} bit; format predicts {m['theory_bits_per_param']:.3f})")
    dora = dora_ratios(doc)
    if dora:
        lines.append("\nDoRA, reference / PEFT (measured, no target):")
        for d in dora:
            lines.append(f"  {d['group']:48s} {d['reference_ms']:10.4f} ms / {d['peft_ms']:10.4f} ms = "
                         f"{d['x_peft']:.3f} +- {d['x_peft_ci']:.3f}  (x floor: reference "
                         f"{_fmt(d['reference_x_floor'])}, PEFT {_fmt(d['peft_x_floor'])})")
    tg = targets(doc)
    if tg:
        met = sum(t["met"] for t in tg)
        lines.append(f"\ntargets: {met}/{len(tg)} met")
        for t in tg:
            if not t["met"]:
                lines.append(f"  MISSED {t['key']}: {t['what']} {t['value']:.3f} > {t['target']}")
    return "\n".join(lines)
