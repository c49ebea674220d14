"""``python -m conformance``: run the spec, list clauses, compare reports, run probes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from conformance.core.outcome import (  # noqa: F401  (EXIT_FAIL, EXIT_NOTHING_CHECKED: re-exported)
    EXIT_BROKEN_PIPE,
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_CHECKED,
    EXIT_OK,
    EXIT_USAGE,
    Outcome,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _usage(msg: str) -> int:
    print(f"conformance: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def cmd_clauses(args: argparse.Namespace) -> int:
    import shutil
    import textwrap

    from .clauses.clause import select

    chosen = select(args.clauses, bound=False)
    if args.markdown:
        from .docs import clauses_markdown

        print(clauses_markdown(chosen), end="")
        return EXIT_OK
    if args.json:
        print(json.dumps([c.to_json() for c in chosen], indent=2))
        return EXIT_OK
    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    indent = " " * 4
    for c in chosen:
        scope = f"{'/'.join(sorted(c.methods))} · {'/'.join(f'{b}bit' for b in sorted(c.bits))}"
        scope += f" · {'/'.join(sorted(c.devices))}"
        if c.requires:
            scope += f" · needs {', '.join(sorted(c.requires))}"
        print(f"{c.id}  {c.level}")
        for text in (c.text, f"[{scope}] source: {c.source}"):
            print(textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent,
                                break_on_hyphens=False))
    print(f"\n{len(chosen)} clauses ({sum(c.level == 'MUST' for c in chosen)} MUST, "
          f"{sum(c.level == 'SHOULD' for c in chosen)} SHOULD)")
    return EXIT_OK


def _check_writable(path: str, option: str) -> str | None:
    """None if a report can be written at ``path`` (``conformance.harness.files.check_writable``)."""
    from conformance.harness.files import check_writable

    return check_writable(path, option)


def parse_impls(impls: list[str], pythons: list[str]) -> tuple[list[str], dict[str, str]]:
    """(targets, interpreter per target) from ``--impl NAME[@PYTHON]`` and ``--python NAME=PYTHON``.

    ValueError (a usage error) for an empty name or path, or two interpreters for one name.
    """
    targets, where = [], {}

    def put(name: str, python: str, option: str) -> None:
        if not name or not python:
            raise ValueError(f"{option}: expected NAME@PYTHON / NAME=PYTHON with both parts, got {option!r}")
        if where.get(name, python) != python:
            raise ValueError(f"{name} is given two interpreters: {where[name]} and {python}")
        where[name] = python

    for spec in impls:
        name, sep, python = spec.partition("@")
        if sep:
            put(name, python, f"--impl {spec}")
        targets.append(name)
    for spec in pythons:
        name, sep, python = spec.partition("=")
        if not sep:
            raise ValueError(f"--python {spec}: expected NAME=PATH (e.g. litgpt=.nox/impl-litgpt/bin/python)")
        put(name, python, f"--python {spec}")
        if name not in targets:
            raise ValueError(f"--python {spec}: no --impl {name} to run in it")
    return targets, where


def cmd_run(args: argparse.Namespace) -> int:
    from conformance.harness import interrupts, runner
    from conformance.harness import xfails as xf

    from .clauses.clause import select

    try:
        impls, pythons = parse_impls(args.impl or [os.environ.get("CONFORMANCE_IMPL") or "reference"], args.python)
    except ValueError as exc:
        return _usage(str(exc))
    for option, value in (("--examples", args.examples), ("--steps", args.steps)):
        if value is not None and value < 1:
            return _usage(f"{option} must be at least 1, got {value}")
    if args.timeout is not None and args.timeout <= 0:
        return _usage(f"--timeout must be positive, got {args.timeout:g}")
    for option, path in (("--report", args.report), ("--markdown", args.markdown)):
        if path and (err := _check_writable(path, option)):
            return _usage(err)
    try:
        entries = [e for path in (args.xfails or []) for e in xf.load(path)]
    except xf.XfailFileError as exc:
        return _usage(str(exc))
    chosen = select(args.clauses, include_slow=args.slow, bound=False)
    if not chosen:
        return _usage(f"no clause matches {args.clauses}; list them with `python -m conformance clauses`")
    report_dir = args.report_dir
    if report_dir is None and (args.report or args.markdown):  # reproducers land next to the report
        report_dir = str(Path(args.report or args.markdown).resolve().parent / "reproducers")
    if args.device == "cuda":
        # torch's NVML-based check initialises no CUDA in this process (workers start from scratch anyway)
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import torch

        if not torch.cuda.is_available():
            return _usage("--device cuda but no CUDA device is visible (torch.cuda.is_available() is False)")
    config = runner.RunConfig(device=args.device, seed=args.seed, examples=args.examples, steps=args.steps,
                              report_dir=report_dir, timeout=args.timeout, timeout_scale=args.timeout_scale,
                              slow=args.slow)
    # Ctrl-C: the first is acted on where it is safe (the partial report is written, exit 130); a second
    # kills the workers and exits 130 at once (conformance.harness.interrupts)
    with interrupts.deferred(hard_exit=True):
        return _run_and_finish(args, chosen, impls, pythons, config, entries)


def _run_and_finish(args: argparse.Namespace, chosen: list, impls: list[str], pythons: dict[str, str],
                    config: object, entries: list) -> int:
    from conformance.harness import interrupts, runner

    infos: list[runner.ImplInfo] = []
    results: list = []
    interrupted = False
    try:
        with contextlib.ExitStack() as stack:
            loaded = []
            for name in impls:  # all load first: a bad --impl is a usage error before anything runs
                where = f" in {pythons[name]}" if name in pythons else ""
                print(f"loading implementation {name!r}{where} ...", file=sys.stderr, flush=True)
                loaded.append(stack.enter_context(
                    runner.open_implementation(name, config, python=pythons.get(name, sys.executable))))
                infos.append(loaded[-1].info)
            for impl in loaded:
                print(f"running {len(chosen)} clauses for {impl.info.name} {impl.info.version} on {args.device}",
                      file=sys.stderr, flush=True)
                results += impl.run(chosen)
                impl.close()  # its fork server is done: free its memory now
    except runner.UsageError as exc:
        return _usage(str(exc))
    except runner.Interrupted as exc:
        results += exc.results
        interrupted = True
    except KeyboardInterrupt:  # while loading an implementation
        interrupted = True
    interrupted = interrupted or interrupts.requested()  # a Ctrl-C while the last workers were stopped
    return _finish(args, chosen, impls, infos, results, entries, interrupted)


def _finish(args: argparse.Namespace, chosen: list, impls: list[str], infos: list, results: list, entries: list,
            interrupted: bool) -> int:
    from conformance.harness import interrupts, report, runner
    from conformance.harness.environment import fingerprint
    from conformance.harness.files import write_with_fallback

    runner.apply_xfails(results, entries, strict=not args.xfail_relaxed)
    done = {(r.clause, r.implementation) for r in results}
    names = [i.name for i in infos] + impls[len(infos):]  # implementations never loaded keep their --impl name
    not_run = [{"clause": c.id, "implementation": n} for n in names for c in chosen if (c.id, n) not in done]
    # the fingerprint of this interpreter, as its workers took it (they had torch loaded); else taken here
    env = next((i.environment for i in infos if i.environment and not i.python), None) or fingerprint(args.device)
    doc = report.build(results, chosen, infos, env, command=shlex.join(sys.argv),
                       not_run=not_run if interrupted else None)
    # each file is complete or absent (a temporary file, then a rename); a second Ctrl-C here exits at once
    interrupts.point("report")
    written, problems = [], []
    for path, render in ((args.report, lambda: json.dumps(doc.to_json(), indent=2) + "\n"),
                         (args.markdown, lambda: report.markdown(doc, base=Path(args.markdown).parent))):
        if path:
            where, problem = write_with_fallback(path, render())
            written.append(where)
            problems += [problem] if problem else []
    print()
    print(report.terminal_table(doc))
    for r in results:
        if Outcome(r.outcome).is_finding:
            print(f"  {r.outcome.upper():<6} {r.level:<6} {r.clause} [{r.implementation}]: "
                  f"{report.shorten(r.message, 160)}")
    if written:
        print("\nwrote " + ", ".join(written))
    for problem in problems:
        print(f"conformance: warning: {problem}", file=sys.stderr)
    if not interrupted and interrupts.requested():  # Ctrl-C while the report was written: it is complete
        print("interrupted after every clause ran (the report is complete)")
        return EXIT_INTERRUPTED
    if interrupted:
        print(f"interrupted: {len(not_run)} clause runs not run (listed as not_run in the report)")
        return EXIT_INTERRUPTED
    status = doc.summary["exit_status"]  # conformance.core.outcome.exit_status: one rule
    for why in (doc.summary.get("nothing_checked") or {}).values():
        print(why)
    print("result: " + {EXIT_FAIL: "FAIL (a MUST clause failed, errored or was inconclusive, or an xfail passed)",
                        EXIT_NOTHING_CHECKED: "NOTHING CHECKED (exit 3: no clause ran for an implementation)"}
          .get(status, "OK (no MUST clause failed)"))
    return status


def cmd_compare(args: argparse.Namespace) -> int:
    from conformance.harness import report

    try:
        old, new = report.load(args.old), report.load(args.new)
    except report.ReportError as exc:
        return _usage(str(exc))
    text, status = report.compare(old, new, drift=args.drift)
    print(text, end="")
    return status


def cmd_join(args: argparse.Namespace) -> int:
    from conformance.core import join
    from conformance.harness import report

    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path and (err := _check_writable(path, option)):
            return _usage(err)
    try:
        doc = join.join([(path, report.load(path)) for path in args.reports])
    except (report.ReportError, join.JoinError) as exc:
        return _usage(str(exc))
    from conformance.harness.files import write_atomic

    text = join.markdown(doc)
    if args.json:
        write_atomic(args.json, json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        write_atomic(args.markdown, text)
    if not (args.json or args.markdown):
        print(text, end="")
    else:
        cols = doc["columns"]
        print(f"joined {len(args.reports)} reports: {len(doc['clauses'])} clauses x {len(cols)} columns "
              f"({', '.join(c['id'] for c in cols)}); {len(join.findings(doc))} findings; wrote "
              + ", ".join(p for p in (args.json, args.markdown) if p))
    return EXIT_OK


def cmd_markdown(args: argparse.Namespace) -> int:
    from conformance.harness import report

    try:
        doc = report.load(args.report)
    except report.ReportError as exc:
        return _usage(str(exc))
    print(report.markdown(doc, base=Path(args.report).parent), end="")
    return EXIT_OK


def _run_clone_probe(args: argparse.Namespace) -> int:
    """The clone probe imports torch: its options (torch-free) are parsed first, so ``probe clone --help`` and a
    typo answer without it."""
    from .probe import options

    p = _Parser(prog="python -m conformance probe clone", description=options.DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_arguments(p)
    parsed = p.parse_args(args.extra)
    from .probe import clone as clone_probe

    return clone_probe.run(parsed)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m conformance", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run the spec's clauses against implementations and write reports")
    r.add_argument("--impl", action="append", default=[],
                   help="implementation: reference, peft, an entry point name, or package.module:attr "
                        "(repeatable; default $CONFORMANCE_IMPL or reference); NAME@PYTHON runs it in that "
                        "interpreter (its own environment, e.g. .nox/impl-litgpt/bin/python)")
    r.add_argument("--python", action="append", default=[], metavar="NAME=PATH",
                   help="run --impl NAME's workers in the interpreter PATH (same as --impl NAME@PATH)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--clauses", action="append", default=[], metavar="PATTERN",
                   help="glob over clause IDs, e.g. 'MERGE-*' (repeatable)")
    r.add_argument("--xfails", metavar="FILE", action="append",
                   help="lines of 'CLAUSE_ID IMPL_PATTERN reason' (repeatable: e.g. a common and a CUDA-only list)")
    r.add_argument("--xfail-relaxed", action="store_true",
                   help="a listed clause that passes stays 'passed' (with a note) instead of 'xpassed' failing the run "
                        "(pytest: parametrize_with_checks(..., xfail_strict=False))")
    r.add_argument("--report", metavar="OUT.json", help="write the JSON report here")
    r.add_argument("--markdown", metavar="OUT.md", help="write the Markdown report here")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--slow", action="store_true", help="the slow tier: include clauses marked slow, and run the "
                   "full product of the base-layer axes where the default tier runs a covering of every pair")
    r.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="per-clause time limit, replacing every clause's own (default: the clause's, mostly 300 s)")
    r.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every clause's own time limit")
    r.add_argument("--examples", type=int, metavar="N",
                   help="hypothesis examples per case of the property and stateful clauses (default: the CI budget)")
    r.add_argument("--steps", type=int, metavar="N", help="steps per stateful example (default: the CI budget)")
    r.add_argument("--report-dir", metavar="DIR",
                   help="where checks write reproducers (default: reproducers/ next to --report or --markdown)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("clauses", help="list the clauses (ID, level, text, scope, source)")
    fmt = c.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true", help="the clause list as a Markdown page (docs/clauses.md)")
    c.add_argument("--clauses", action="append", default=[], metavar="PATTERN")
    c.set_defaults(func=cmd_clauses)

    from . import docs

    docs.add_parser(sub)

    k = sub.add_parser("compare", help="compare two JSON reports clause by clause (exit 1 on a new failure)")
    k.add_argument("old")
    k.add_argument("new")
    k.add_argument("--drift", type=float, default=0.25, help="relative change of a measurement worth listing")
    k.set_defaults(func=cmd_compare)

    j = sub.add_parser("join", help="several JSON reports side by side: clause x implementation@version, "
                       "outcome per cell, the findings (Markdown on stdout unless --json/--markdown)")
    j.add_argument("reports", nargs="+", metavar="REPORT.json")
    j.add_argument("--json", metavar="OUT.json", help="write the joined table as JSON")
    j.add_argument("--markdown", metavar="OUT.md", help="write the joined table as Markdown")
    j.set_defaults(func=cmd_join)

    m = sub.add_parser("markdown", help="render a JSON report as Markdown")
    m.add_argument("report")
    m.set_defaults(func=cmd_markdown)

    pr = sub.add_parser("probe", help="probes for maintainers (clone: is the defensive clone still needed?)")
    probes = pr.add_subparsers(dest="probe", required=True, parser_class=_Parser)
    clone = probes.add_parser("clone", add_help=False, help="in-place updates on the raw 4-bit/8-bit base output, with and without "
                              "the defensive clone")
    clone.set_defaults(func=_run_clone_probe)  # its own options are parsed when it runs (they need torch)
    st = sub.add_parser("stateful", add_help=False, help="long state-machine runs: --impl NAME --examples N "
                        "[--steps S] [--device cuda] [--out DIR] (see 'stateful --help')")
    st.set_defaults(func=_run_stateful)
    return p


def _run_stateful(args: argparse.Namespace) -> int:
    from conformance.harness.stateful_run import main as stateful_main

    return stateful_main(list(args.extra))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.func not in (_run_clone_probe, _run_stateful):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # outside a run (which writes its partial report itself)
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `conformance clauses | head`: the reader left; end quietly, as `ls | head` does
        with contextlib.suppress(OSError):  # no second BrokenPipeError when the interpreter flushes stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
