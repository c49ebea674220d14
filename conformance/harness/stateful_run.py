"""``python -m conformance stateful --impl NAME --examples N [--steps S] [--seed N | --random] [--device cuda] [--out DIR]``.

Runs the state machine directly (not through the clause runner) and prints a summary: examples
and steps run, worst observed/bound ratios, and every violation with its minimal sequence and the
path of its reproducer script. Exit status 1 when a violation was found.

Sequences are derandomized by default (the same every run); ``--seed N`` generates them from seed N
(the same for the same N and budget, a case alone included: ``--case lora/8``), ``--random`` from a
fresh seed that the summary prints (``--seed`` with it replays the run).
"""

from __future__ import annotations

import argparse
import random
import sys

from conformance.clauses.budget import CI


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed takes a non-negative integer, got {text!r} (e.g. --seed 3)")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance stateful", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default=None, help="implementation (built-in name, entry point or package.module:attr)")
    p.add_argument("--examples", type=int, default=None, help=f"examples per (method, bits) case (default {CI.stateful_examples})")
    p.add_argument("--steps", type=int, default=None, help=f"steps per example (default {CI.stateful_steps})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="directory for reproducer scripts (default: a fresh temporary directory)")
    p.add_argument("--case", action="append", default=[], help="restrict to METHOD/BITS, e.g. lora/4 (repeatable)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--seed", type=_seed, default=None, metavar="N",
                     help="generate the sequences from hypothesis seed N (reproducible: same N, same sequences)")
    how.add_argument("--random", action="store_true",
                     help="explore new sequences: a fresh seed, printed in the summary (--seed replays it)")
    p.add_argument("--exclude-invalid", default="", help="comma-separated invalid-step kinds to leave out "
                   "(to look past a known finding), e.g. set_unknown,merge_unknown")
    p.add_argument("--shrink-s", type=float, default=None, help="seconds of shrinking per case after its first "
                   f"violation (default {CI.stateful_shrink_s:g})")
    args = p.parse_args(argv)  # --help and usage errors answer before torch is imported
    from conformance.clauses.stateful.run import run
    from conformance.quant.layers import quiet_int8_cast_notice

    quiet_int8_cast_notice()

    from conformance.clauses.interface import ImplementationNotFound, ImplementationUnsupported
    from conformance.harness.loader import load

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
    seed = random.SystemRandom().randrange(2**32) if args.random else args.seed
    res = run(impl, args.device, target=args.impl, examples=args.examples, steps=args.steps, cases=cases, out=args.out,
              derandomize=seed is None, seed=seed, shrink_s=args.shrink_s,
              exclude_invalid=[k for k in args.exclude_invalid.split(",") if k])
    print(res.summary())
    return 1 if (res.failures or res.errors) else 0

