"""``python -m conformance``: run the spec, list clauses, compare reports, run probes."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _usage(msg: str) -> int:
    print(f"conformance: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def cmd_clauses(args: argparse.Namespace) -> int:
    from .spec.clauses import select

    chosen = select(args.clauses)
    if args.json:
        print(json.dumps([c.to_json() for c in chosen], indent=2))
        return EXIT_OK
    for c in chosen:
        scope = f"{'/'.join(sorted(c.methods))} · {'/'.join(f'{b}bit' for b in sorted(c.bits))}"
        scope += f" · {'/'.join(sorted(c.devices))}"
        if c.requires:
            scope += f" · needs {', '.join(sorted(c.requires))}"
        print(f"{c.id:<36} {c.level:<6} {c.text}\n{'':<43}[{scope}] source: {c.source}")
    print(f"\n{len(chosen)} clauses ({sum(c.level == 'MUST' for c in chosen)} MUST, "
          f"{sum(c.level == 'SHOULD' for c in chosen)} SHOULD)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from conformance.harness import report, runner
    from conformance.harness import xfails as xf
    from conformance.harness.environment import fingerprint

    from .spec.clauses import select

    impls = args.impl or [os.environ.get("CONFORMANCE_IMPL") or "reference"]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return _usage("--device cuda but no CUDA device is visible (torch.cuda.is_available() is False)")
    try:
        entries = [e for path in (args.xfails or []) for e in xf.load(path)]
    except xf.XfailFileError as exc:
        return _usage(str(exc))
    chosen = select(args.clauses, include_slow=args.slow)
    if not chosen:
        return _usage(f"no clause matches {args.clauses}; list them with `python -m conformance clauses`")
    if args.report:  # stateful reproducers and other artefacts land next to the report
        os.environ.setdefault("CONFORMANCE_REPORT_DIR", str(Path(args.report).resolve().parent / "reproducers"))
    for path in (args.report, args.markdown):
        if path and not Path(path).parent.exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    infos, results = [], []
    try:
        for name in impls:
            print(f"loading implementation {name!r} ...", file=sys.stderr, flush=True)
            infos.append(runner.describe(name))
        for info in infos:
            print(f"running {len(chosen)} clauses for {info.name} {info.version} on {args.device}", file=sys.stderr,
                  flush=True)
            results += runner.run_implementation(info.target, chosen, device=args.device, seed=args.seed,
                                                 timeout_scale=args.timeout_scale, label=info.name)
    except runner.UsageError as exc:
        return _usage(str(exc))
    runner.apply_xfails(results, entries)
    doc = report.build(results, chosen, infos, fingerprint(args.device), command=shlex.join(sys.argv))
    if args.report:
        Path(args.report).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(report.markdown(doc), encoding="utf-8")
    print()
    print(report.terminal_table(doc))
    for r in results:
        if r.outcome in ("failed", "error"):
            print(f"  {r.outcome.upper():<6} {r.level:<6} {r.clause} [{r.implementation}]: {r.message[:160]}")
    written = [p for p in (args.report, args.markdown) if p]
    if written:
        print("\nwrote " + ", ".join(written))
    status = doc["summary"]["exit_status"]
    print("result: " + ("FAIL (a MUST clause failed or errored)" if status else "OK (no MUST clause failed)"))
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


def cmd_markdown(args: argparse.Namespace) -> int:
    from conformance.harness import report

    try:
        doc = report.load(args.report)
    except report.ReportError as exc:
        return _usage(str(exc))
    print(report.markdown(doc), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m conformance", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run the spec's clauses against implementations and write reports")
    r.add_argument("--impl", action="append", default=[],
                   help="implementation: reference, peft, an entry point name, or package.module:attr "
                        "(repeatable; default $CONFORMANCE_IMPL or reference)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--clauses", action="append", default=[], metavar="PATTERN",
                   help="glob over clause IDs, e.g. 'MERGE-*' (repeatable)")
    r.add_argument("--xfails", metavar="FILE", action="append",
                   help="lines of 'CLAUSE_ID IMPL_PATTERN reason' (repeatable: e.g. a common and a CUDA-only list)")
    r.add_argument("--report", metavar="OUT.json", help="write the JSON report here")
    r.add_argument("--markdown", metavar="OUT.md", help="write the Markdown report here")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--slow", action="store_true", help="include clauses marked slow")
    r.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every per-clause timeout")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("clauses", help="list the clauses (ID, level, text, scope, source)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--clauses", action="append", default=[], metavar="PATTERN")
    c.set_defaults(func=cmd_clauses)

    k = sub.add_parser("compare", help="compare two JSON reports clause by clause (exit 1 on a new failure)")
    k.add_argument("old")
    k.add_argument("new")
    k.add_argument("--drift", type=float, default=0.25, help="relative change of a measurement worth listing")
    k.set_defaults(func=cmd_compare)

    m = sub.add_parser("markdown", help="render a JSON report as Markdown")
    m.add_argument("report")
    m.set_defaults(func=cmd_markdown)

    pr = sub.add_parser("probe", help="probes for maintainers (clone: is the defensive clone still needed?)")
    probes = pr.add_subparsers(dest="probe", required=True, parser_class=_Parser)
    clone = probes.add_parser("clone", help="in-place updates on the raw 4-bit/8-bit base output, with and without "
                              "the defensive clone")
    try:
        from .probe import clone as clone_probe

        clone_probe.add_arguments(clone)
        clone.set_defaults(func=clone_probe.run)
    except ImportError as exc:  # pragma: no cover - only while the probe module is missing
        clone.set_defaults(func=lambda a, _e=exc: _usage(f"clone probe unavailable: {_e}"))
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    args = build_parser().parse_args(argv)
    from conformance.quant.layers import quiet_int8_cast_notice

    quiet_int8_cast_notice()
    return int(args.func(args) or 0)
