"""Generated documentation: the parts of ``docs/`` made from the typed sources, and the check that they agree.

One source of truth: the method and capability tables of ``docs/implementing.md`` come from
``conformance.core.vocabulary`` (``Method``, ``Capability``, ``DOCS``, ``METHOD_DOCS``, ``LAYER_API``), the
report format of ``docs/running.md`` from the records of ``conformance.core.report`` (field names, types and
their ``#:`` comments or docstrings, read from the source), and the whole of ``docs/clauses.md`` from the
clause catalog (``python -m conformance clauses --markdown``).

A generated section sits between ``<!-- generated: conformance docs NAME -->`` and ``<!-- end generated -->``;
the text around it is written by hand. ``python -m conformance docs --check`` names every page out of date,
``--write`` rewrites them. Standard library only, no torch: the clause catalog it reads is torch-free.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the command that rewrites every generated page
WRITE_COMMAND = "python -m conformance docs --write"
END = "<!-- end generated -->"

#: the records of ``conformance/core/report.py`` in the order the report nests them
REPORT_RECORDS = ("Report", "ImplementationInfo", "ClauseInfo", "Result", "Family")


def _cell(text: Any) -> str:
    """``text`` as one Markdown table cell (pipes escaped, no line breaks)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


# -- the vocabulary (docs/implementing.md) ---------------------------------------------------------------------

def vocabulary_tables() -> str:
    """The method table and the capability table, from ``conformance.core.vocabulary``."""
    from conformance.core.vocabulary import DOCS, LAYER_API, METHOD_DOCS, Capability, Method

    lines = ["**Methods** (`conformance.core.vocabulary.Method`, documented in `METHOD_DOCS`):", ""]
    lines += _table(["method", "what it promises"], ((f"`{m.value}`", METHOD_DOCS[m]) for m in Method))
    lines += ["", "**Capabilities** (`Capability`; what each promises: `DOCS`; where the layer keeps the promise: "
              "`LAYER_API`):", ""]
    lines += _table(["capability", "what declaring it promises", "where the layer keeps it"],
                    ((f"`{c.value}`", DOCS[c], f"`{LAYER_API[c]}`" if c in LAYER_API else "")
                     for c in Capability))
    return "\n".join(lines)


def method_table() -> str:
    """The twin clauses' method table (``conformance.core.methods.TABLE``): config, rule, derivation."""
    from conformance.core.methods import TABLE

    lines = ["**The method table** (`conformance.core.methods.TABLE`: each method's minimal valid config, PEFT's "
             "names, and how the TWIN-* clauses bound it against its dense twin, `conformance.numerics.twin`):", ""]
    lines += _table(["method", "PEFT config", "minimal config", "twin rule", "why the rule fits (PEFT 0.21.2)"],
                    ((f"`{m.value}`", f"`{r.peft_config}`", f"`{dict(r.config)}`", f"`{r.rule.value}`",
                      r.derivation + (f" Training forward: {r.sampled_training}." if r.sampled_training else ""))
                     for m, r in TABLE.items()))
    return "\n".join(lines)


def init_table() -> str:
    """The init clauses' table (``conformance.core.inits.TABLE``): value, rule, capability, preparation, source."""
    from conformance.core.inits import TABLE

    lines = ["**The initialization table** (`conformance.core.inits.TABLE`: what `AdapterSpec.params"
             "['init_lora_weights']` carries, the rule the INIT-* clauses hold it to, the capability that declares it, "
             "what the implementation prepares itself):", ""]
    lines += _table(["init", "`init_lora_weights`", "rule", "capability", "the implementation prepares", "source"],
                    ((f"`{i.value}`", f"`{r.value}`", f"`{r.rule.value}`", f"`{r.capability.value}`", r.needs or "-",
                      r.source) for i, r in TABLE.items()))
    return "\n".join(lines)


# -- the report format (docs/running.md) -----------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    name: str
    type: str
    default: str
    doc: str


def _comment(line: str) -> str:
    """The ``#:`` comment of a source line ('' if none)."""
    i = line.find("#:")
    return line[i + 2:].strip() if i >= 0 else ""


def record_fields(source: str, record: str) -> tuple[str, list[Field]]:
    """(docstring, fields) of the dataclass ``record`` in ``source``: each field's annotation, default and its
    ``#:`` comment (trailing, or on the lines just above it)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == record:
            break
    else:
        raise LookupError(f"no class {record} in conformance/core/report.py")
    fields = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        doc = _comment(lines[stmt.lineno - 1])
        above = []
        i = stmt.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#:"):
            above.insert(0, _comment(lines[i]))
            i -= 1
        doc = " ".join(above + ([doc] if doc else []))
        default = ast.unparse(stmt.value) if stmt.value is not None else ""
        default = re.sub(r"^field\(default_factory=(\w+)\)$", r"\1()", default)
        fields.append(Field(stmt.target.id, ast.unparse(stmt.annotation), default, doc))
    return " ".join((ast.get_docstring(node) or "").split()), fields


def report_format() -> str:
    """One table per record of ``conformance/core/report.py`` (``Report`` first), read from its source."""
    from conformance.core import report

    source = Path(report.__file__).read_text(encoding="utf-8")
    lines = [f"Schema version `{report.SCHEMA_VERSION}` (reads {', '.join(f'`{v}`' for v in report.READS)}); "
             "the records of `conformance/core/report.py`, field by field:"]
    for record in REPORT_RECORDS:
        doc, fields = record_fields(source, record)
        lines += ["", f"**`{record}`**: {doc}", ""]
        lines += _table(["field", "type", "default", "meaning"],
                        ((f"`{f.name}`", f"`{f.type}`", f"`{f.default}`" if f.default else "", f.doc)
                         for f in fields))
    return "\n".join(lines)


# -- the clauses (docs/clauses.md) -----------------------------------------------------------------------------

def _scope(c: Any) -> str:
    parts = ["/".join(sorted(str(m) for m in c.methods)), "/".join(f"{b}bit" for b in sorted(c.bits)),
             "/".join(sorted(c.devices))]
    if c.requires:
        parts.append("needs " + ", ".join(sorted(str(r) for r in c.requires)))
    if c.slow:
        parts.append("slow")
    if getattr(c, "tiered", False):
        parts.append("base-layer matrix (larger with --slow)")
    return " · ".join(parts)


def clauses_markdown(clauses: Iterable[Any] | None = None) -> str:
    """The clause list as a Markdown page (``python -m conformance clauses --markdown``): one table per area,
    every clause with its ID, level, text, scope (methods · bits · devices · needed capabilities) and source."""
    if clauses is None:
        from conformance.clauses.clause import catalog

        clauses = catalog().values()
    clauses = list(clauses)
    areas: dict[str, list[Any]] = {}
    for c in clauses:
        areas.setdefault(c.area or "other", []).append(c)
    must = sum(c.level == "MUST" for c in clauses)
    lines = ["# The clauses", "",
             "<!-- generated: python -m conformance clauses --markdown (do not edit: "
             f"`{WRITE_COMMAND}` rewrites this page) -->", "",
             f"{len(clauses)} clauses ({must} MUST, {len(clauses) - must} SHOULD) in {len(areas)} areas, as "
             "`python -m conformance clauses` lists them. Scope: the adapter methods, base bit widths and devices a "
             "clause applies to, and the capabilities it needs (an implementation that does not declare them gets "
             "`skipped` with the reason). A MUST failure fails the run; a SHOULD failure is reported only.", ""]
    lines += [", ".join(f"[{area}](#{area.lower().replace(' ', '-')}) ({len(cs)})" for area, cs in areas.items()),
              ""]
    for area, cs in areas.items():
        lines += [f"## {area}", ""]
        lines += _table(["ID", "level", "clause", "scope", "source"],
                        ((f"`{c.id}`", c.level, c.text, _scope(c), c.source) for c in cs))
        lines.append("")
    return "\n".join(lines)


# -- pages -------------------------------------------------------------------------------------------------------

#: generated section name -> (page, renderer)
SECTIONS: dict[str, tuple[str, Callable[[], str]]] = {
    "implementing": ("docs/implementing.md", vocabulary_tables),
    "methods": ("docs/implementing.md", method_table),
    "inits": ("docs/implementing.md", init_table),
    "report-format": ("docs/running.md", report_format),
}

#: pages generated whole -> renderer
PAGES: dict[str, Callable[[], str]] = {
    "docs/clauses.md": clauses_markdown,
}


class DocsError(ValueError):
    """A page cannot be checked (missing, or without its generated section); the message says which and why."""


def begin(name: str) -> str:
    return f"<!-- generated: conformance docs {name} -->"


def fill(text: str, name: str, body: str, page: str = "") -> str:
    """``text`` with the generated section ``name`` replaced by ``body``."""
    start = begin(name)
    i = text.find(start)
    j = text.find(END, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise DocsError(f"{page or 'the page'} has no section `{start}` ... `{END}`: add both markers where the "
                        f"generated part belongs, then run `{WRITE_COMMAND}`")
    return text[: i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def expected(root: Path) -> dict[str, str]:
    """page (relative to ``root``) -> the text it must have."""
    out: dict[str, str] = {page: render() for page, render in PAGES.items()}
    for name, (page, render) in SECTIONS.items():
        path = root / page
        if page not in out:
            if not path.is_file():
                raise DocsError(f"{page} is missing under {root}: restore it from git (its generated sections are "
                                f"filled by `{WRITE_COMMAND}`)")
            out[page] = path.read_text(encoding="utf-8")
        out[page] = fill(out[page], name, render(), page)
    return out


def stale(root: Path) -> list[str]:
    """The generated pages under ``root`` whose text differs from what their sources give."""
    return [page for page, text in expected(root).items()
            if not (root / page).is_file() or (root / page).read_text(encoding="utf-8") != text]


def write(root: Path) -> list[str]:
    """Rewrite the stale pages; returns them."""
    pages = expected(root)
    changed = stale(root)
    for page in changed:
        (root / page).write_text(pages[page], encoding="utf-8")
    return changed


# -- the command (``python -m conformance docs``) ------------------------------------------------------------

def add_parser(sub: Any) -> None:
    """The ``docs`` subcommand on the CLI's subparsers."""
    d = sub.add_parser("docs", help="check (default) or rewrite the generated pages of docs/ (torch-free)")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 naming every page out of date (the default)")
    mode.add_argument("--write", action="store_true", help="rewrite the generated pages and sections")
    d.add_argument("--root", metavar="CHECKOUT", help="the checkout holding docs/ (default: this package's)")
    d.set_defaults(func=command)


def command(args: Any) -> int:
    """``python -m conformance docs [--check | --write] [--root CHECKOUT]``: 0 up to date (or rewritten), 1 stale
    pages (named, with the command that fixes them), 2 bad usage (one line)."""
    import sys

    from conformance.core.outcome import EXIT_FAIL, EXIT_OK, EXIT_USAGE

    root = Path(args.root) if args.root else Path(__file__).resolve().parents[1]
    try:
        if not (root / "docs").is_dir():
            raise DocsError(f"no docs/ folder under {root}: run from a checkout or give --root CHECKOUT")
        pages = write(root) if args.write else stale(root)
    except DocsError as exc:
        print(f"conformance: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.write:
        print(f"rewrote {', '.join(pages)}" if pages else "generated pages up to date: nothing to write")
        return EXIT_OK
    if pages:
        print(f"out of date: {', '.join(pages)}; run `{WRITE_COMMAND}`", file=sys.stderr)
        return EXIT_FAIL
    print(f"generated pages up to date ({len(PAGES) + len(SECTIONS)} pages and sections)")
    return EXIT_OK
