"""The clone probe's report: the collapsed table of failing factor patterns, the verdict per environment, the
comparison with a stored baseline, and the JSON and text forms."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

FACTORS = ("quant", "dtype", "rank", "batch", "x_requires_grad", "mode", "batch_kind", "technique")


def _versions(env: dict[str, Any]) -> tuple[str, str]:
    pk = env.get("packages", {})
    return str(pk.get("torch") or torch.__version__), str(pk.get("bitsandbytes") or "?")


def collapse(rows: Sequence[dict[str, Any]], universe: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summarise case rows: factor by factor, a group of rows that differ only in that factor and
    hold every value the ``universe`` has for it becomes one row with '*' there. Deterministic."""
    cur = {tuple(r[f] for f in FACTORS) for r in rows}
    uni = {tuple(r[f] for f in FACTORS) for r in universe}
    for i, _ in enumerate(FACTORS):
        def key(t: tuple, i: int = i) -> tuple:
            return t[:i] + t[i + 1:]

        possible: dict[tuple, set] = {}
        for t in uni:
            possible.setdefault(key(t), set()).add(t[i])
        groups: dict[tuple, set] = {}
        for t in cur:
            groups.setdefault(key(t), set()).add(t[i])
        nxt = set()
        for k, vals in groups.items():
            if len(vals) > 1 and vals == possible.get(k):
                nxt.add(k[:i] + ("*",) + k[i:])
            else:
                nxt |= {k[:i] + (v,) + k[i:] for v in vals}
        cur = nxt
        uni |= {k[:i] + ("*",) + k[i:] for k, v in possible.items() if len(v) > 1}
    return [dict(zip(FACTORS, t)) for t in sorted(cur, key=str)]


def _pattern(r: dict[str, Any]) -> str:
    return " ".join(f"{f}={r[f]}" for f in FACTORS if r[f] != "*") or "every case"


def verdict(records: Sequence[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    tv, bv = _versions(env)
    required = [r for r in records if r["clone_required"]]
    both = [r for r in records if r["both_fail"]]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["uncloned"]["outcome"]] = counts.get(r["uncloned"]["outcome"], 0) + 1
    patterns = [_pattern(p) for p in collapse(required, records)] if required else []
    if required:
        line = f"clone still required for: {len(required)}/{len(records)} cases: " + "; ".join(patterns)
    else:
        line = f"not required in any case on torch {tv} / bnb {bv} ({len(records)} cases)"
    if both:
        line += f" [{len(both)} cases fail even with the clone: see both_fail]"
    return {"clone_required": bool(required), "line": line, "patterns": patterns, "required": [r["id"] for r in required],
            "both_fail": [r["id"] for r in both], "uncloned_outcomes": counts, "cases": len(records),
            "torch": tv, "bitsandbytes": bv}


def compare(current: dict[str, Any], baseline: dict[str, Any]) -> tuple[list[str], bool]:
    """(lines describing what changed per case, whether some case regressed from works)."""
    old = {c["id"]: c for c in baseline.get("cases", [])}
    new = {c["id"]: c for c in current.get("cases", [])}
    lines, regressed = [], False
    for cid in sorted(set(old) | set(new)):
        if cid not in new:
            lines.append(f"- {cid}: only in the baseline")
            continue
        if cid not in old:
            lines.append(f"+ {cid}: new case (uncloned {new[cid]['uncloned']['outcome']})")
            continue
        for path in ("uncloned", "cloned"):
            a, b = old[cid][path]["outcome"], new[cid][path]["outcome"]
            if a != b:
                worse = a == "works" and b in ("raises", "wrong")
                regressed |= worse
                why = f": {new[cid][path].get('error_type', '')} {new[cid][path].get('error', '')}".rstrip(": ")
                lines.append(f"{'!' if worse else '~'} {cid} [{path}]: {a} -> {b}{why if b != 'works' else ''}")
    ov, nv = baseline.get("verdict", {}).get("line"), current.get("verdict", {}).get("line")
    if ov != nv:
        lines.append(f"verdict was: {ov}")
        lines.append(f"verdict now: {nv}")
    return lines, regressed


def dumps(report: dict[str, Any]) -> str:
    """JSON with one case per line (diffable, a third of the indented size)."""
    head = {k: v for k, v in report.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2]
    cases = ",\n  ".join(json.dumps(c, separators=(",", ":")) for c in report.get("cases", []))
    return text + ',\n "cases": [\n  ' + cases + "\n ]\n}\n"


def table(records: Sequence[dict[str, Any]]) -> str:
    head = f"{'case':<72} {'uncloned':<8} {'cloned':<8} {'clone req':<9} detail"
    out = [head, "-" * len(head)]
    for r in records:
        u = r["uncloned"]
        detail = f"{u.get('error_type', '')}: {u.get('error', '')}"[:90] if u["outcome"] != "works" else ""
        out.append(f"{r['id']:<72} {u['outcome']:<8} {r['cloned']['outcome']:<8} "
                   f"{'yes' if r['clone_required'] else 'no':<9} {detail}")
    return "\n".join(out)
