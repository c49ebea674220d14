"""Reports: the versioned JSON document, the Markdown page, and comparing two runs.

JSON (``schema_version`` "1"): ``{schema_version, generated_at, command, environment,
implementations: {name: {version, capabilities, unsupported}}, clauses: {id: {level, text, source,
area}}, results: [{clause, implementation, outcome, message, duration_s, measurements, level,
device}], summary: {implementation: {outcome: count, must_failures: n}, exit_status}}``.
See docs in README ("Report format").
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conformance.harness.results import OUTCOMES, Result, exit_status
from conformance.harness.runner import ImplInfo
from conformance.spec.clauses import Clause

SCHEMA_VERSION = "1"
MARKS = {"passed": "✅", "failed": "❌", "error": "💥", "inconclusive": "❔", "skipped": "➖", "xfailed": "⚠️ xfail", "xpassed": "❗ xpass"}


class ReportError(ValueError):
    """A report file cannot be read or is not a conformance report."""


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for r in results:
        s = per.setdefault(r.implementation, {o: 0 for o in OUTCOMES} | {"must_failures": 0, "total": 0})
        s[r.outcome] += 1
        s["total"] += 1
        if r.outcome in ("failed", "error") and r.level == "MUST":
            s["must_failures"] += 1
    return {"implementations": per, "exit_status": exit_status(list(results))}


def build(
    results: Sequence[Result], clauses: Sequence[Clause], impls: Sequence[ImplInfo], environment: dict[str, Any],
    command: str = "",
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment,
        "implementations": {
            i.name: {"version": i.version, "capabilities": i.capabilities, "unsupported": i.unsupported} for i in impls
        },
        "clauses": {c.id: {"level": c.level, "text": c.text, "source": c.source, "area": c.area} for c in clauses},
        "results": [r.to_json() for r in results],
        "summary": summarize(results),
    }


def load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read report {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{p} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "schema_version" not in doc or "results" not in doc:
        raise ReportError(f"{p} is not a conformance report (no schema_version/results)")
    if str(doc["schema_version"]).split(".")[0] != SCHEMA_VERSION:
        raise ReportError(f"{p} has schema_version {doc['schema_version']}, this tool reads {SCHEMA_VERSION}")
    return doc


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_env(env: dict[str, Any]) -> str:
    pk = env.get("packages", {})
    hw = env.get("gpu", {}).get("name") if env.get("gpu") else env.get("cpu")
    return (f"Python {env.get('python')} · torch {pk.get('torch')} (CUDA {env.get('torch_cuda')}) · "
            f"bitsandbytes {pk.get('bitsandbytes')} · transformers {pk.get('transformers')} · peft {pk.get('peft')} · "
            f"device {env.get('device')} ({hw}) · suite {env.get('suite_version')} @ {env.get('suite_git_sha')}"
            + (f" (sources {env['suite_source_sha256']})" if env.get("suite_source_sha256") else ""))


def markdown(doc: dict[str, Any]) -> str:
    """A clause x implementation matrix, then every failure with its message."""
    impls = list(doc["implementations"])
    cells: dict[tuple[str, str], dict[str, Any]] = {(r["clause"], r["implementation"]): r for r in doc["results"]}
    lines = ["# Adapter conformance report", "", _fmt_env(doc["environment"]), ""]
    lines += ["| implementation | version | " + " | ".join(OUTCOMES) + " | MUST failures |",
              "|---|---|" + "---|" * (len(OUTCOMES) + 1)]
    for name in impls:
        s = doc["summary"]["implementations"].get(name, {})
        lines.append(f"| {name} | {doc['implementations'][name]['version']} | "
                     + " | ".join(str(s.get(o, 0)) for o in OUTCOMES) + f" | {s.get('must_failures', 0)} |")
    lines += ["", "## Clauses", "", "| clause | level | " + " | ".join(impls) + " |",
              "|---|---|" + "---|" * len(impls)]
    for cid, meta in doc["clauses"].items():
        row = [MARKS.get(cells[(cid, i)]["outcome"], "?") if (cid, i) in cells else "" for i in impls]
        lines.append(f"| `{cid}` | {meta['level']} | " + " | ".join(row) + " |")
    bad = [r for r in doc["results"] if r["outcome"] in ("failed", "error", "xpassed")]
    if bad:
        lines += ["", "## Failures and errors", ""]
        for r in bad:
            meta = doc["clauses"].get(r["clause"], {})
            lines += [f"### `{r['clause']}` · {r['implementation']} · {r['outcome']} ({meta.get('level', '?')})", "",
                      f"> {_cell(meta.get('text', ''))}", "", "```", r["message"].strip() or "(no message)", "```", ""]
    measured = [r for r in doc["results"] if r.get("measurements")]
    if measured:
        lines += ["", "## Measurements", "", "| clause | implementation | measurements |", "|---|---|---|"]
        for r in measured:
            m = {k: v for k, v in r["measurements"].items() if k != "notes"}
            if m:
                lines.append(f"| `{r['clause']}` | {r['implementation']} | {_cell(json.dumps(m)[:300])} |")
    skipped = [r for r in doc["results"] if r["outcome"] == "skipped"]
    if skipped:
        lines += ["", "<details><summary>Skipped clauses and why</summary>", ""]
        lines += [f"- `{r['clause']}` · {r['implementation']}: {r['message']}" for r in skipped]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _numeric(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def compare(old: dict[str, Any], new: dict[str, Any], drift: float = 0.25) -> tuple[str, int]:
    """Clause-by-clause changes; exit code 1 when a clause that passed (or was new) now fails/errors."""
    o = {(r["clause"], r["implementation"]): r for r in old["results"]}
    n = {(r["clause"], r["implementation"]): r for r in new["results"]}
    bad = {"failed", "error"}
    new_failures, fixes, changed, drifts, added, removed = [], [], [], [], [], []
    for key in sorted(set(o) | set(n)):
        a, b = o.get(key), n.get(key)
        label = f"{key[0]} [{key[1]}]"
        if a is None:
            added.append(f"{label}: {b['outcome']}")
            if b["outcome"] in bad:
                new_failures.append(f"{label}: (new clause) {b['outcome']}: {b['message'][:200]}")
            continue
        if b is None:
            removed.append(label)
            continue
        if b["outcome"] in bad and a["outcome"] not in bad:
            new_failures.append(f"{label}: {a['outcome']} -> {b['outcome']}: {b['message'][:200]}")
        elif a["outcome"] in bad and b["outcome"] not in bad:
            fixes.append(f"{label}: {a['outcome']} -> {b['outcome']}")
        elif a["outcome"] != b["outcome"]:
            changed.append(f"{label}: {a['outcome']} -> {b['outcome']}")
        ma, mb = _numeric(a.get("measurements", {})), _numeric(b.get("measurements", {}))
        for k in sorted(set(ma) & set(mb)):
            base = max(abs(ma[k]), 1e-12)
            rel = (mb[k] - ma[k]) / base
            if abs(rel) > drift:
                drifts.append(f"{label} {k}: {ma[k]:.4g} -> {mb[k]:.4g} ({rel:+.0%})")
    out = [f"old: {_fmt_env(old['environment'])}", f"new: {_fmt_env(new['environment'])}", ""]
    for title, items in (("New failures", new_failures), ("Fixed", fixes), ("Other outcome changes", changed),
                         (f"Measurement drift > {drift:.0%}", drifts), ("New clauses", added),
                         ("Clauses no longer reported", removed)):
        out.append(f"{title}: {len(items)}")
        out += [f"  - {i}" for i in items]
    return "\n".join(out) + "\n", int(bool(new_failures))


def terminal_table(doc: dict[str, Any]) -> str:
    """The end-of-run summary table (plain text)."""
    impls = list(doc["implementations"])
    head = f"{'implementation':<16}" + "".join(f"{o:>9}" for o in OUTCOMES) + f"{'MUST-fail':>11}"
    rows = [head, "-" * len(head)]
    for name in impls:
        s = doc["summary"]["implementations"].get(name, {})
        rows.append(f"{name:<16}" + "".join(f"{s.get(o, 0):>9}" for o in OUTCOMES) + f"{s.get('must_failures', 0):>11}")
    return "\n".join(rows)
