"""Reports: building the versioned JSON document (``conformance.core.report.Report``, where its schema is
documented), the Markdown page, the terminal table, and comparing two runs. Every function here takes a ``Report``
or its JSON document (schema "1" or "2": read through ``Report.from_json``). Torch-free: ``compare`` and
``markdown`` use it. See docs/running.md ("Report format", generated from ``core.report``).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conformance.core.outcome import MARKS as _MARKS
from conformance.core.outcome import NOT_RUN, OUTCOMES, Outcome, counts_for_exit
from conformance.core.report import (
    SCHEMA_VERSION,
    ClauseInfo,
    Family,
    ImplementationInfo,
    Report,
    ReportError,
    Result,
    as_report,
    load_report,
)
from conformance.harness.results import exit_status, nothing_checked

if TYPE_CHECKING:
    from conformance.clauses.clause import Clause
    from conformance.harness.runner import ImplInfo

#: the Markdown report's symbol and legend per outcome (``conformance.core.outcome.MARKS``)
MARKS = {o: m.symbol for o, m in _MARKS.items()}
MEANINGS = {o: m.meaning for o, m in _MARKS.items()}
NOT_RUN_MARK = NOT_RUN.symbol

__all__ = ["SCHEMA_VERSION", "Report", "ReportError", "Result", "build", "compare", "load", "markdown", "summarize",
           "terminal_table"]


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
) -> Report:
    """The report of a run; ``not_run`` (an interrupted run) lists the (clause, implementation) pairs never
    reached. An implementation run in its own interpreter (``--impl NAME@PYTHON``) keeps where and what is
    installed there."""
    return Report(
        results=list(results),
        implementations={i.name: ImplementationInfo(i.version, list(i.capabilities), dict(i.unsupported),
                                                    i.python, dict(i.packages) if i.python else {},
                                                    list(i.methods)) for i in impls},
        clauses={c.id: ClauseInfo(c.level, c.text, c.source, c.area) for c in clauses},
        environment=environment, summary=summarize(results),
        generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=command,
        not_run=[dict(x) for x in not_run] if not_run is not None else None)


def load(path: str | Path) -> Report:
    """A report file of schema "1" or "2" (``ReportError``: one line saying why not)."""
    return load_report(path)


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


def _duration(r: Result) -> str:
    if r.outcome is Outcome.SKIPPED:
        return ""
    d = float(r.duration_s or 0.0)
    return f"{d:.1f} s" if d >= 1 else f"{d:.2f} s"


def family_cases(families: dict[str, Family]) -> str:
    """``Result.families`` in one line: ``lora/4bit 12 run · lora/8bit 6 run, 6 skipped (needs input_cast: 6)``
    (a family skipped whole says so; one that did not pass gets its outcome)."""
    parts = []
    for fam, d in families.items():
        if d.outcome is Outcome.SKIPPED and not d.run:
            parts.append(f"{fam} skipped")
            continue
        text = f"{fam} {d.run or 0} run"
        if d.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in d.skip_reasons.items())
            text += f", {d.skipped} skipped" + (f" ({reasons})" if reasons else "")
        if d.outcome is not Outcome.PASSED:
            text += f" [{d.outcome}]"
        parts.append(text)
    return " · ".join(parts)


def _measured(r: Result) -> list[tuple[str, Any]]:
    """A result's rows in the Measurements table: its numbers, the other values a check recorded, the cases
    skipped per capability, the outcome of each of several families, and its reproducers (nested mappings as
    dotted keys)."""
    rows = _flat(r.measurements) + _flat(r.details)
    if r.cases_skipped:
        rows += _flat({"cases_skipped": r.cases_skipped})
    if len(r.families) > 1:
        rows += [(f"families.{f}", fam.text()) for f, fam in r.families.items()]
    if r.reproducers:
        rows.append(("reproducer", r.reproducers[0]))
    if len(r.reproducers) > 1:
        rows.append(("reproducers", list(r.reproducers)))
    return rows


def markdown(doc: Report | dict[str, Any], base: str | Path | None = None) -> str:
    """A legend, the summary, a clause x implementation matrix (mark and duration), then every failure
    with its message and reproducer, the measurements as a table, and skips with their reasons.

    ``base``: the folder the Markdown file is written to (reproducer links are made relative to it).
    """
    rep = as_report(doc)
    base = Path(base).resolve() if base is not None else None
    impls = list(rep.implementations)
    for x in rep.not_run or []:
        if x["implementation"] not in impls:
            impls.append(x["implementation"])
    cells: dict[tuple[str, str], Result] = {(r.clause, r.implementation): r for r in rep.results}
    not_run = {(x["clause"], x["implementation"]) for x in rep.not_run or []}
    lines = ["# Adapter conformance report", "", _fmt_env(rep.environment), ""]
    if not_run:
        lines += [f"**Interrupted**: {len(not_run)} clause runs were not run ({NOT_RUN_MARK}).", ""]
    for why in (rep.summary.get("nothing_checked") or {}).values():
        lines += [f"**Nothing checked**: {why}", ""]
    lines += ["| implementation | version | " + " | ".join(OUTCOMES) + " | MUST failures |",
              "|---|---|" + "---|" * (len(OUTCOMES) + 1)]
    for name in impls:
        s = (rep.summary.get("implementations") or {}).get(name, {})
        info = rep.implementations.get(name)
        version = info.version if info is not None else "not loaded"
        lines.append(f"| {name} | {version} | " + " | ".join(str(s.get(o, 0)) for o in OUTCOMES)
                     + f" | {s.get('must_failures', 0)} |")
    lines += ["", "## Clauses", "", "| clause | level | " + " | ".join(impls) + " |",
              "|---|---|" + "---|" * len(impls)]
    for cid, meta in rep.clauses.items():
        row = []
        for i in impls:
            r = cells.get((cid, i))
            if r is not None:
                row.append(" ".join(x for x in (MARKS[r.outcome], _duration(r)) if x))
            else:
                row.append(NOT_RUN_MARK if (cid, i) in not_run else "")
        lines.append(f"| `{cid}` | {meta.level} | " + " | ".join(row) + " |")
    lines += ["", "Each cell: the outcome's mark and the check's duration.", "", "| mark | outcome | meaning |",
              "|---|---|---|"]
    lines += [f"| {MARKS[o]} | {o} | {MEANINGS[o]} |" for o in OUTCOMES]
    if not_run:
        lines.append(f"| {NOT_RUN_MARK} | not run | {NOT_RUN.meaning} |")
    bad = [r for r in rep.results if r.outcome.is_finding]
    if bad:
        lines += ["", "## Failures and errors", ""]
        for r in bad:
            meta = rep.clauses.get(r.clause)
            lines += [f"### `{r.clause}` · {r.implementation} · {r.outcome} ({meta.level if meta else '?'})", "",
                      f"> {_cell(meta.text if meta else '')}", "", "```", r.message.strip() or "(no message)", "```",
                      ""]
            if r.reproducers:
                lines += ["Reproducer: " + ", ".join(_link(p, base) for p in r.reproducers), ""]
    measured = [(r, rows) for r in rep.results if (rows := _measured(r))]
    if measured:
        lines += ["", "## Measurements", "", "| clause | implementation | measurement | value |", "|---|---|---|---|"]
        for r, rows in measured:
            for k, v in rows:
                value = _link(v, base) if k == "reproducer" and isinstance(v, str) else \
                    _cell(shorten(_fmt_value(v), 200))
                lines.append(f"| `{r.clause}` | {r.implementation} | {_cell(k)} | {value} |")
    counted = [r for r in rep.results if any(f.counted for f in r.families.values())]
    if counted:
        lines += ["", "## Cases per family", "",
                  "Cases run and skipped (with the reasons) in each case family; a family that ran no case is "
                  "inconclusive.", "", "| clause | implementation | cases |", "|---|---|---|"]
        lines += [f"| `{r.clause}` | {r.implementation} | {_cell(family_cases(r.families))} |" for r in counted]
    skipped = [r for r in rep.results if r.outcome is Outcome.SKIPPED]
    if skipped:
        lines += ["", "<details><summary>Skipped clauses and why</summary>", ""]
        lines += [f"- `{r.clause}` · {r.implementation}: {r.message}" for r in skipped]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def compare(old: Report | dict[str, Any], new: Report | dict[str, Any], drift: float = 0.25) -> tuple[str, int]:
    """Clause-by-clause changes; exit code 1 when a result that counts for the exit status
    (``Outcome.counts_for_exit``: a MUST clause failed, errored or was inconclusive, or an xpass) is new: a
    clause that did not count before (or was not reported) counts now. The same rule as ``run``'s exit status,
    so a report whose run exited 1 has a new failure against any report whose run exited 0. Either report may be
    of schema "1" or "2"."""
    old, new = as_report(old), as_report(new)
    o = {(r.clause, r.implementation): r for r in old.results}
    n = {(r.clause, r.implementation): r for r in new.results}

    def counts(r: Result) -> bool:
        return counts_for_exit(r.outcome, r.level)

    new_failures, fixes, changed, drifts, added, removed = [], [], [], [], [], []
    for key in sorted(set(o) | set(n)):
        a, b = o.get(key), n.get(key)
        label = f"{key[0]} [{key[1]}]"
        if a is None:
            added.append(f"{label}: {b.outcome}")
            if counts(b):
                new_failures.append(f"{label}: (new clause) {b.outcome}: {shorten(b.message, 200)}")
            continue
        if b is None:
            removed.append(label)
            continue
        if counts(b) and not counts(a):
            new_failures.append(f"{label}: {a.outcome} -> {b.outcome}: {shorten(b.message, 200)}")
        elif counts(a) and not counts(b):
            fixes.append(f"{label}: {a.outcome} -> {b.outcome}")
        elif a.outcome != b.outcome:
            changed.append(f"{label}: {a.outcome} -> {b.outcome}")
        ma, mb = a.numeric(), b.numeric()
        for k in sorted(set(ma) & set(mb)):
            base = max(abs(ma[k]), 1e-12)
            rel = (mb[k] - ma[k]) / base
            if abs(rel) > drift:
                drifts.append(f"{label} {k}: {ma[k]:.4g} -> {mb[k]:.4g} ({rel:+.0%})")
    out = [f"old: {_fmt_env(old.environment)}", f"new: {_fmt_env(new.environment)}", ""]
    for title, items in (("New failures", new_failures), ("Fixed", fixes), ("Other outcome changes", changed),
                         (f"Measurement drift > {drift:.0%}", drifts), ("New clauses", added),
                         ("Clauses no longer reported", removed)):
        out.append(f"{title}: {len(items)}")
        out += [f"  - {i}" for i in items]
    return "\n".join(out) + "\n", int(bool(new_failures))


def terminal_table(doc: Report | dict[str, Any]) -> str:
    """The end-of-run summary table (plain text)."""
    rep = as_report(doc)
    impls = list(rep.implementations)
    width = {o: max(9, len(o) + 2) for o in OUTCOMES}
    name_w = max([16] + [len(n) + 2 for n in impls])
    head = f"{'implementation':<{name_w}}" + "".join(f"{o:>{width[o]}}" for o in OUTCOMES) + f"{'MUST-fail':>11}"
    rows = [head, "-" * len(head)]
    for name in impls:
        s = (rep.summary.get("implementations") or {}).get(name, {})
        rows.append(f"{name:<{name_w}}" + "".join(f"{s.get(o, 0):>{width[o]}}" for o in OUTCOMES)
                    + f"{s.get('must_failures', 0):>11}")
    if rep.not_run:
        rows.append(f"not run (interrupted): {len(rep.not_run)}")
    return "\n".join(rows)
