"""``python -m conformance stateful --impl NAME --examples N [--steps S] [--device cuda] [--out DIR]``.

Runs the state machine directly (not through the clause runner) and prints a summary: examples
and steps run, worst observed/bound ratios, and every violation with its minimal sequence and the
path of its reproducer script. Exit status 1 when a violation was found.
"""

from __future__ import annotations

import argparse
import sys

from conformance.spec.budget import CI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance stateful", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default=None, help="implementation (built-in name, entry point or package.module:attr)")
    p.add_argument("--examples", type=int, default=None, help=f"examples per (method, bits) case (default {CI.stateful_examples})")
    p.add_argument("--steps", type=int, default=None, help=f"steps per example (default {CI.stateful_steps})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="directory for reproducer scripts (default: a fresh temporary directory)")
    p.add_argument("--case", action="append", default=[], help="restrict to METHOD/BITS, e.g. lora/4 (repeatable)")
    p.add_argument("--random", action="store_true", help="do not derandomize (explore new sequences each run)")
    p.add_argument("--exclude-invalid", default="", help="comma-separated invalid-step kinds to leave out "
                   "(to look past a known finding), e.g. set_unknown,merge_unknown")
    p.add_argument("--shrink-s", type=float, default=None, help="seconds of shrinking per case after its first "
                   f"violation (default {CI.stateful_shrink_s:g})")
    args = p.parse_args(argv)  # --help and usage errors answer before torch is imported
    from conformance.quant.layers import quiet_int8_cast_notice
    from conformance.spec.stateful.run import run

    quiet_int8_cast_notice()

    from conformance.harness.loader import load
    from conformance.spec.interface import ImplementationNotFound, ImplementationUnsupported

    try:
        impl = load(args.impl)
    except (ImplementationNotFound, ImplementationUnsupported) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cases = None
    if args.case:
        cases = []
        for c in args.case:
            m, _, b = c.partition("/")
            cases.append((m, int(b.removesuffix("bit"))))
    res = run(impl, args.device, target=args.impl, examples=args.examples, steps=args.steps, cases=cases, out=args.out,
              derandomize=not args.random, shrink_s=args.shrink_s,
              exclude_invalid=[k for k in args.exclude_invalid.split(",") if k])
    print(res.summary())
    return 1 if (res.failures or res.errors) else 0

