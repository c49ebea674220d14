"""The summary table of the stored conformance reports (``baselines/conformance/*.json``), generated from their
``summary`` so the README beside them cannot drift from what is stored. Stdlib only.

``python -m conformance.ci.baseline_table`` prints it; ``--write`` puts it into the README between its markers,
``--check`` exits 1 when the README's table is not the generated one (``suites/test_docs.py`` runs it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .matrix import ROOT

DIRECTORY = ROOT / "baselines" / "conformance"
README = DIRECTORY / "README.md"
BEGIN, END = "<!-- summary-table: begin (python -m conformance.ci.baseline_table --write) -->", \
    "<!-- summary-table: end -->"
_NAMES = {"peft": "PEFT", "litgpt": "LitGPT", "adapters": "adapters", "reference": "reference"}
_COLUMNS = ("passed", "failed", "error", "inconclusive", "skipped", "xfailed", "xpassed")


def _rows(path: Path) -> list[str]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    summary = doc.get("summary", {}).get("implementations") if isinstance(doc, dict) else None
    if not summary:
        return []  # a step log or another kind of JSON
    impls = doc.get("implementations", {})
    out = []
    for name, counts in summary.items():
        version = impls.get(name, {}).get("version", "")
        who = _NAMES.get(name, name) + (f" {version}" if name != "reference" and version else "")
        cells = " | ".join(str(counts.get(k, 0)) for k in _COLUMNS)
        md = next((f"{s}.md" for s in (path.stem, path.stem.rsplit("-", 1)[0]) if (path.parent / f"{s}.md").is_file()),
                  None)
        report = f"[`{path.stem}`]({md})" if md else f"`{path.stem}`"
        out.append(f"| {report} | {counts.get('total', '')} | {who} | {cells} | "
                   f"{counts.get('must_failures', 0)} |")
    return out


def table(directory: Path = DIRECTORY) -> str:
    """One row per (report, implementation), reports in name order; each links its Markdown report (a JSON of one
    implementation, ``<slug>-peft.json``, shares ``<slug>.md``)."""
    head = ("| report | clauses | implementation | " + " | ".join(_COLUMNS) + " | MUST failed |\n"
            "|---|---:|---|" + "---:|" * (len(_COLUMNS) + 1))
    rows = [r for p in sorted(directory.glob("*.json")) for r in _rows(p)]
    return "\n".join([head, *rows])


def _with_table(text: str, directory: Path) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {README} has no summary-table markers; add the lines {BEGIN!r} and {END!r}")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{table(directory)}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(table())
        return 0
    if args not in (["--write"], ["--check"]):
        print("usage: python -m conformance.ci.baseline_table [--write | --check]", file=sys.stderr)
        return 2
    text = README.read_text(encoding="utf-8")
    new = _with_table(text, DIRECTORY)
    if args == ["--write"]:
        README.write_text(new, encoding="utf-8")
        return 0
    if new != text:
        print(f"{README.relative_to(ROOT)}: the summary table is not the one the stored reports give; "
              "run `python -m conformance.ci.baseline_table --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
