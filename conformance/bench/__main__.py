"""``python -m conformance.bench [--device cuda] [--quick] [--out DIR] [--compare OLD.json] [--impl NAME[@PYTHON]]``

Runs the benchmark matrix (``conformance.bench.cases``), writes ``DIR/<environment-slug>.json`` and a
PNG next to it, prints the summary table, and with ``--compare`` runs the noise-aware regression
compare against an older result (exit 1 on a regression). ``--impl`` adds an implementation found as the
conformance runner finds one (a built-in name, an entry point, ``package.module:attr``, or ``NAME@PYTHON`` to time
it in another interpreter) beside the reference in every group the matrix times the reference in. ``--methods``
picks the adapter methods (``--methods dora``: DoRA's cases alone; the default, LoRA and OFT, is the matrix of the
stored baselines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from conformance.bench import DEFAULT_METHODS, METHODS, parse_methods
from conformance.harness.files import write_atomic

if TYPE_CHECKING:
    from . import cases as bench_cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny smoke matrix (256x256, 8 tokens)")
    p.add_argument("--out", default="baselines/bench", help="directory for the JSON and PNG (baselines/bench)")
    p.add_argument("--name", default=None, help="file stem (default: the environment slug)")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="compare with an older result")
    p.add_argument("--threshold", type=float, default=0.05, help="regression threshold for --compare (0.05)")
    p.add_argument("--normalize", default=None, metavar="IMPL", help="--compare relative to this implementation "
                   "of the same group (e.g. bnb): cancels machine-speed drift between the runs")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M[,M..]",
                   help=f"adapter methods to time, of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)}: the "
                   "stored baselines' matrix; --methods dora times DoRA's cases alone)")
    p.add_argument("--filter", default=None, help="only cases whose key contains all these ,-separated parts")
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting new cases after this long")
    p.add_argument("--repeats", type=int, default=3, help="extra independent runs of the main cases (spread)")
    p.add_argument("--passes", type=int, default=1, help="walk the matrix N times and pool the rounds (shared "
                   "machines: every case sees the same load drift)")
    p.add_argument("--impl", action="append", default=[], metavar="NAME[@PYTHON]",
                   help="also time this implementation (repeatable): built-in, entry point, package.module:attr; "
                   "@PYTHON runs it in that interpreter")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    try:
        methods = parse_methods(args.methods)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = _check_impls(args.impl)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from conformance.quant.layers import quiet_int8_cast_notice

    from . import cases as bench_cases  # torch from here on: --help and usage errors answer without it
    from . import compare as bench_compare
    from .report import summary_table

    quiet_int8_cast_notice()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if device == "cpu" and args.quick:
        torch.set_num_threads(1)  # the smoke runs on shared 2-core machines: one thread keeps medians steady
    from .runner import run

    Path(args.out).mkdir(parents=True, exist_ok=True)
    matrix = with_impls(bench_cases.matrix(device, args.quick, methods), args.impl)
    matrix = bench_cases.select(matrix, args.filter)
    mem_shapes = sorted({(c.in_features, c.out_features) for c in matrix})  # only the shapes that were run
    from conformance.harness.runner import UsageError

    try:
        doc = run(matrix, device, args.quick, args.max_seconds, args.repeats, mem_shapes=mem_shapes,
                  partial_path=Path(args.out) / ".partial.json", passes=args.passes)
    except UsageError as exc:  # an interpreter of NAME@PYTHON that cannot run the bench
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or doc["slug"] + ("-quick" if args.quick else "")
    path = out / f"{stem}.json"
    write_atomic(path, json.dumps(doc, default=str, separators=(",", ":")))
    (out / ".partial.json").unlink(missing_ok=True)
    print(summary_table(doc))
    print(f"\nwrote {path}")
    if not args.no_plot:
        try:
            from .plot import plot

            for fig in plot(doc, path.with_suffix(".png")):
                print(f"wrote {fig}")
        except ImportError as exc:  # matplotlib is an optional extra ([plot])
            print(f"no plot: {exc}")
    if args.compare:
        extra = ["--normalize", args.normalize] if args.normalize else []
        return bench_compare.main([args.compare, str(path), "--threshold", str(args.threshold), *extra])
    return 0


def _check_impls(impls: list[str]) -> str | None:
    """One line naming what is wrong with the ``--impl`` values, or None (names loaded here; an interpreter
    of ``NAME@PYTHON`` is checked when the run starts)."""
    from conformance.cli import parse_impls
    from conformance.harness.loader import (
        ImplementationNotFound,
        ImplementationUnsupported,
        InvalidImplementation,
        load,
    )

    try:
        parse_impls(impls, [])
    except ValueError as exc:
        return str(exc)
    for spec in impls:
        if "@" not in spec:
            try:
                load(spec)
            except (ImplementationNotFound, ImplementationUnsupported, InvalidImplementation) as exc:
                return f"--impl {spec}: {exc}"
    return None


def with_impls(matrix: list[bench_cases.BenchCase], impls: list[str]) -> list[bench_cases.BenchCase]:
    """``matrix`` with a row of each of ``impls`` after every ``reference`` row (one not in it already)."""
    out = []
    for case in matrix:
        out.append(case)
        if case.impl == "reference":
            out += [case.with_impl(i) for i in impls if i != "reference" and case.with_impl(i) not in matrix]
    return out


if __name__ == "__main__":
    sys.exit(main())
