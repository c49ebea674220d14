"""Reports: the versioned JSON document, the Markdown page, and comparing two runs.

JSON (``schema_version`` "1"): ``{schema_version, generated_at, command, environment,
implementations: {name: {version, capabilities, unsupported}}, clauses: {id: {level, text, source,
area}}, results: [{clause, implementation, outcome, message, duration_s, measurements, level,
device, families}], summary: {implementations: {implementation: {outcome: count, must_failures: n, total: n}},
exit_status, nothing_checked: {implementation: why}}}``, and
``not_run: [{clause, implementation}]`` when the run was interrupted (Ctrl-C) before reaching
them. ``families`` (absent in older reports) maps each case family to its outcome, the cases run and skipped
and the skip reasons (``harness.execute``). A measurement ``reproducer`` (or ``reproducers``) is the path of a script that replays the
failure. See docs in README ("Report format"). Torch-free: ``compare`` and ``markdown`` use it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conformance.core.outcome import MUST, OUTCOMES, Outcome, counts_for_exit
from conformance.harness.results import Result, exit_status, nothing_checked

if TYPE_CHECKING:
    from conformance.harness.runner import ImplInfo
    from conformance.spec.clauses import Clause

SCHEMA_VERSION = "1"
MARKS = {Outcome.PASSED: "✅", Outcome.FAILED: "❌", Outcome.ERROR: "💥", Outcome.INCONCLUSIVE: "❔",
         Outcome.SKIPPED: "➖", Outcome.XFAILED: "⚠️ xfail", Outcome.XPASSED: "❗ xpass"}
MEANINGS = {
    Outcome.PASSED: "the implementation does what the clause says",
    Outcome.FAILED: "it does not (the message says how)",
    Outcome.ERROR: "the check could not run: an exception, a crash or a timeout",
    Outcome.INCONCLUSIVE: "the check ran too little to give a verdict",
    Outcome.SKIPPED: "the clause does not apply (capability, device)",
    Outcome.XFAILED: "failed or errored, as a listed known bug",
    Outcome.XPASSED: "passed although listed as a known bug",
}
NOT_RUN_MARK = "⏹️"


class ReportError(ValueError):
    """A report file cannot be read or is not a conformance report."""


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    """Outcome counts per implementation; ``must_failures`` counts the MUST clauses that failed, errored or
    were inconclusive (``Outcome.is_failure``: what fails the run besides an ``xpassed``); ``exit_status``
    is the run's (``results.exit_status``), ``nothing_checked`` why an implementation had no clause run."""
    per: dict[str, Any] = {}
    for r in results:
        s = per.setdefault(r.implementation, {o.value: 0 for o in OUTCOMES} | {"must_failures": 0, "total": 0})
        o = Outcome(r.outcome)
        s[o.value] += 1
        s["total"] += 1
        if o.is_failure and r.level == "MUST":
            s["must_failures"] += 1
    out = {"implementations": per, "exit_status": exit_status(results)}
    empty = nothing_checked(results)
    if empty:
        out["nothing_checked"] = empty
    return out


def build(
    results: Sequence[Result], clauses: Sequence[Clause], impls: Sequence[ImplInfo], environment: dict[str, Any],
    command: str = "", not_run: Sequence[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The JSON document; ``not_run`` (an interrupted run) lists the (clause, implementation) pairs never reached."""
    doc = {
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
    if not_run is not None:
        doc["not_run"] = [dict(x) for x in not_run]
    return doc


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


def shorten(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, cut at a word boundary with an ellipsis."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    cut = flat[: width - 1]
    if " " in cut and flat[width - 1] != " ":
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_env(env: dict[str, Any]) -> str:
    pk = env.get("packages", {})
    hw = env.get("gpu", {}).get("name") if env.get("gpu") else env.get("cpu")
    return (f"Python {env.get('python')} · torch {pk.get('torch')} (CUDA {env.get('torch_cuda')}) · "
            f"bitsandbytes {pk.get('bitsandbytes')} · transformers {pk.get('transformers')} · peft {pk.get('peft')} · "
            f"device {env.get('device')} ({hw}) · suite {env.get('suite_version')} @ {env.get('suite_git_sha')}"
            + (f" (sources {env['suite_source_sha256']})" if env.get("suite_source_sha256") else ""))


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt_value(x) for x in v)
    return str(v)


def _flat(measurements: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) rows; nested dicts become ``outer.inner`` keys, never a cut JSON string."""
    rows: list[tuple[str, Any]] = []
    for k, v in measurements.items():
        if isinstance(v, dict):
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _link(path: str, base: Path | None) -> str:
    target = path
    if base is not None:
        try:
            target = os.path.relpath(path, base)
        except ValueError:  # another drive (Windows)
            target = path
    return f"[`{Path(path).name}`]({target.replace(' ', '%20')})"


def reproducers(result: dict[str, Any]) -> list[str]:
    """Reproducer paths a result's measurements name (``reproducer`` first, then ``reproducers``)."""
    m = result.get("measurements") or {}
    paths = [m["reproducer"]] if isinstance(m.get("reproducer"), str) else []
    paths += [p for p in m.get("reproducers") or [] if isinstance(p, str) and p not in paths]
    return paths


def _duration(r: dict[str, Any]) -> str:
    if r["outcome"] == Outcome.SKIPPED:
        return ""
    d = float(r.get("duration_s") or 0.0)
    return f"{d:.1f} s" if d >= 1 else f"{d:.2f} s"


def family_cases(families: dict[str, dict[str, Any]]) -> str:
    """``Result.families`` in one line: ``lora/4bit 12 run · lora/8bit 6 run, 6 skipped (needs input_cast: 6)``
    (a family skipped whole says so; one that did not pass gets its outcome)."""
    parts = []
    for fam, d in families.items():
        if d.get("outcome") == "skipped" and not d.get("run"):
            parts.append(f"{fam} skipped")
            continue
        text = f"{fam} {d.get('run', 0)} run"
        if d.get("skipped"):
            reasons = ", ".join(f"{k}: {v}" for k, v in (d.get("skip_reasons") or {}).items())
            text += f", {d['skipped']} skipped" + (f" ({reasons})" if reasons else "")
        if d.get("outcome") not in (None, "passed"):
            text += f" [{d['outcome']}]"
        parts.append(text)
    return " · ".join(parts)


def markdown(doc: dict[str, Any], base: str | Path | None = None) -> str:
    """A legend, the summary, a clause x implementation matrix (mark and duration), then every failure
    with its message and reproducer, the measurements as a table, and skips with their reasons.

    ``base``: the folder the Markdown file is written to (reproducer links are made relative to it).
    """
    base = Path(base).resolve() if base is not None else None
    impls = list(doc["implementations"])
    for x in doc.get("not_run", []):
        if x["implementation"] not in impls:
            impls.append(x["implementation"])
    cells: dict[tuple[str, str], dict[str, Any]] = {(r["clause"], r["implementation"]): r for r in doc["results"]}
    not_run = {(x["clause"], x["implementation"]) for x in doc.get("not_run", [])}
    lines = ["# Adapter conformance report", "", _fmt_env(doc["environment"]), ""]
    if not_run:
        lines += [f"**Interrupted**: {len(not_run)} clause runs were not run ({NOT_RUN_MARK}).", ""]
    for why in (doc["summary"].get("nothing_checked") or {}).values():
        lines += [f"**Nothing checked**: {why}", ""]
    lines += ["| implementation | version | " + " | ".join(OUTCOMES) + " | MUST failures |",
              "|---|---|" + "---|" * (len(OUTCOMES) + 1)]
    for name in impls:
        s = doc["summary"]["implementations"].get(name, {})
        version = doc["implementations"].get(name, {}).get("version", "not loaded")
        lines.append(f"| {name} | {version} | " + " | ".join(str(s.get(o, 0)) for o in OUTCOMES)
                     + f" | {s.get('must_failures', 0)} |")
    lines += ["", "## Clauses", "", "| clause | level | " + " | ".join(impls) + " |",
              "|---|---|" + "---|" * len(impls)]
    for cid, meta in doc["clauses"].items():
        row = []
        for i in impls:
            r = cells.get((cid, i))
            if r is not None:
                row.append(" ".join(x for x in (MARKS.get(r["outcome"], "?"), _duration(r)) if x))
            else:
                row.append(NOT_RUN_MARK if (cid, i) in not_run else "")
        lines.append(f"| `{cid}` | {meta['level']} | " + " | ".join(row) + " |")
    lines += ["", "Each cell: the outcome's mark and the check's duration.", "", "| mark | outcome | meaning |",
              "|---|---|---|"]
    lines += [f"| {MARKS[o]} | {o} | {MEANINGS[o]} |" for o in OUTCOMES]
    if not_run:
        lines.append(f"| {NOT_RUN_MARK} | not run | the run was interrupted before this clause |")
    bad = [r for r in doc["results"] if Outcome(r["outcome"]).is_finding]
    if bad:
        lines += ["", "## Failures and errors", ""]
        for r in bad:
            meta = doc["clauses"].get(r["clause"], {})
            lines += [f"### `{r['clause']}` · {r['implementation']} · {r['outcome']} ({meta.get('level', '?')})", "",
                      f"> {_cell(meta.get('text', ''))}", "", "```", r["message"].strip() or "(no message)", "```", ""]
            repro = reproducers(r)
            if repro:
                lines += ["Reproducer: " + ", ".join(_link(p, base) for p in repro), ""]
    measured = [(r, _flat({k: v for k, v in r["measurements"].items() if k != "notes"}))
                for r in doc["results"] if r.get("measurements")]
    measured = [(r, rows) for r, rows in measured if rows]
    if measured:
        lines += ["", "## Measurements", "", "| clause | implementation | measurement | value |", "|---|---|---|---|"]
        for r, rows in measured:
            for k, v in rows:
                value = _link(v, base) if k in ("reproducer", "reproducers") and isinstance(v, str) else \
                    _cell(shorten(_fmt_value(v), 200))
                lines.append(f"| `{r['clause']}` | {r['implementation']} | {_cell(k)} | {value} |")
    counted = [r for r in doc["results"] if r.get("families")]
    if counted:
        lines += ["", "## Cases per family", "",
                  "Cases run and skipped (with the reasons) in each case family; a family that ran no case is "
                  "inconclusive.", "", "| clause | implementation | cases |", "|---|---|---|"]
        lines += [f"| `{r['clause']}` | {r['implementation']} | {_cell(family_cases(r['families']))} |"
                  for r in counted]
    skipped = [r for r in doc["results"] if r["outcome"] == Outcome.SKIPPED]
    if skipped:
        lines += ["", "<details><summary>Skipped clauses and why</summary>", ""]
        lines += [f"- `{r['clause']}` · {r['implementation']}: {r['message']}" for r in skipped]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _numeric(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def compare(old: dict[str, Any], new: dict[str, Any], drift: float = 0.25) -> tuple[str, int]:
    """Clause-by-clause changes; exit code 1 when a result that counts for the exit status
    (``Outcome.counts_for_exit``: a MUST clause failed, errored or was inconclusive, or an xpass) is new: a
    clause that did not count before (or was not reported) counts now. The same rule as ``run``'s exit status,
    so a report whose run exited 1 has a new failure against any report whose run exited 0."""
    o = {(r["clause"], r["implementation"]): r for r in old["results"]}
    n = {(r["clause"], r["implementation"]): r for r in new["results"]}

    def counts(r: dict[str, Any], doc: dict[str, Any]) -> bool:
        level = r.get("level") or (doc.get("clauses") or {}).get(r["clause"], {}).get("level") or MUST
        return counts_for_exit(r["outcome"], level)

    new_failures, fixes, changed, drifts, added, removed = [], [], [], [], [], []
    for key in sorted(set(o) | set(n)):
        a, b = o.get(key), n.get(key)
        label = f"{key[0]} [{key[1]}]"
        if a is None:
            added.append(f"{label}: {b['outcome']}")
            if counts(b, new):
                new_failures.append(f"{label}: (new clause) {b['outcome']}: {shorten(b['message'], 200)}")
            continue
        if b is None:
            removed.append(label)
            continue
        if counts(b, new) and not counts(a, old):
            new_failures.append(f"{label}: {a['outcome']} -> {b['outcome']}: {shorten(b['message'], 200)}")
        elif counts(a, old) and not counts(b, new):
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
    width = {o: max(9, len(o) + 2) for o in OUTCOMES}
    name_w = max([16] + [len(n) + 2 for n in impls])
    head = f"{'implementation':<{name_w}}" + "".join(f"{o:>{width[o]}}" for o in OUTCOMES) + f"{'MUST-fail':>11}"
    rows = [head, "-" * len(head)]
    for name in impls:
        s = doc["summary"]["implementations"].get(name, {})
        rows.append(f"{name:<{name_w}}" + "".join(f"{s.get(o, 0):>{width[o]}}" for o in OUTCOMES)
                    + f"{s.get('must_failures', 0):>11}")
    if doc.get("not_run"):
        rows.append(f"not run (interrupted): {len(doc['not_run'])}")
    return "\n".join(rows)
