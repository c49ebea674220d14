"""The generated parts of docs/ agree with their sources, and the front door stays a front door.

``conformance/docs.py`` renders docs/clauses.md whole and the marked sections of docs/implementing.md and
docs/running.md from the typed sources (the clause catalog, ``core.vocabulary``, ``core.report``). Default tier: no
torch, no interpreter started.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conformance import cli, docs
from conformance.clauses.clause import catalog
from conformance.core.vocabulary import Capability, Method

ROOT = Path(__file__).resolve().parents[1]


def test_generated_pages_are_in_sync() -> None:
    stale = docs.stale(ROOT)
    assert not stale, f"{', '.join(stale)} out of date with their sources: run `{docs.WRITE_COMMAND}`"


def test_clauses_page_names_every_clause() -> None:
    text = (ROOT / "docs" / "clauses.md").read_text(encoding="utf-8")
    missing = [cid for cid in catalog() if f"`{cid}`" not in text]
    assert not missing, f"docs/clauses.md lacks {missing}: run `python -m conformance clauses --markdown`"


def test_clauses_markdown_is_the_cli_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["clauses", "--markdown"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "clauses.md").read_text(encoding="utf-8")


def test_check_names_a_stale_page_and_write_repairs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """meta: the sync check can fail, names the page and the command, and ``--write`` fixes exactly that."""
    (tmp_path / "docs").mkdir()
    for page in ("clauses.md", "implementing.md", "running.md"):
        (tmp_path / "docs" / page).write_text((ROOT / "docs" / page).read_text(encoding="utf-8"), encoding="utf-8")
    impl = tmp_path / "docs" / "implementing.md"
    impl.write_text(impl.read_text(encoding="utf-8").replace("| `unmerge` |", "| `unmerged` |"), encoding="utf-8")
    assert cli.main(["docs", "--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"out of date: docs/implementing.md; run `{docs.WRITE_COMMAND}`"
    assert cli.main(["docs", "--write", "--root", str(tmp_path)]) == 0
    assert impl.read_text(encoding="utf-8") == (ROOT / "docs" / "implementing.md").read_text(encoding="utf-8")
    assert cli.main(["docs", "--root", str(tmp_path)]) == 0


def test_a_page_without_its_markers_is_a_one_line_usage_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "implementing.md").write_text("# no markers\n", encoding="utf-8")
    (tmp_path / "docs" / "running.md").write_text("# no markers\n", encoding="utf-8")
    assert cli.main(["docs", "--check", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "<!-- generated: conformance docs" in err and docs.WRITE_COMMAND in err


def test_generated_tables_cover_the_vocabulary_and_the_report() -> None:
    vocab = docs.vocabulary_tables()
    assert all(f"| `{m.value}` |" in vocab for m in Method)
    assert all(f"| `{c.value}` |" in vocab for c in Capability)
    fmt = docs.report_format()
    from conformance.core import report
    for record in docs.REPORT_RECORDS:
        names = [f.name for f in __import__("dataclasses").fields(getattr(report, record))]
        assert all(f"| `{n}` |" in fmt for n in names), record


def test_readme_is_a_front_door() -> None:
    """At most 12 KB; the two set-up commands; every relative link resolves."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes: move detail to docs/"
    assert "python -m pip install nox && nox -s report" in text and "nox -s tests" in text


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
                                  "baselines/conformance/README.md", "baselines/matrix/README.md"])
def test_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    broken = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
              if "://" not in t and not (path.parent / t).exists()]
    assert not broken, f"{page}: links to missing files {broken}"


def test_the_baselines_summary_table_is_the_stored_reports() -> None:
    from conformance.ci import baseline_table

    assert baseline_table.main(["--check"]) == 0, "run `python -m conformance.ci.baseline_table --write`"


def test_the_baselines_summary_table_follows_a_report(tmp_path: Path) -> None:
    import json

    from conformance.ci import baseline_table

    doc = {"implementations": {"peft": {"version": "9.9"}},
           "summary": {"implementations": {"peft": {"passed": 3, "failed": 2, "xfailed": 1, "total": 6,
                                                    "must_failures": 2}}}}
    (tmp_path / "cpu-x.json").write_text(json.dumps(doc), encoding="utf-8")
    (tmp_path / "steps.json").write_text("[]", encoding="utf-8")
    rows = baseline_table.table(tmp_path).splitlines()[2:]
    assert rows == ["| `cpu-x` | 6 | PEFT 9.9 | 3 | 2 | 0 | 0 | 0 | 1 | 0 | 2 |"]
    (tmp_path / "cpu.md").write_text("", encoding="utf-8")  # the Markdown of a report split by implementation
    assert baseline_table.table(tmp_path).splitlines()[2].startswith("| [`cpu-x`](cpu.md) | 6 | PEFT 9.9 |")
