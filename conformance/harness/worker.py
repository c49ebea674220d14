"""The worker side of the runner: load an implementation, run clauses, append one JSON event per line.

Two ways to run it, both started by ``conformance.harness.runner`` in the interpreter it was given:

- ``--serve`` (Linux, the default): a fork server (``conformance.harness.zygote``) imports torch,
  bitsandbytes, every check module and the implementation once, then forks one child per batch of
  clauses; a child that crashes or hangs costs a fork, not an interpreter start;
- ``--clauses A,B,...`` (where ``os.fork`` is missing): a fresh interpreter runs the batch.

Either way an implementation that segfaults, aborts or hangs takes down only the process running
the batch; the runner records the clause as ``error`` and starts another batch for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

# torch.cuda.is_available() (bitsandbytes calls it on import) asks NVML instead of initialising the
# CUDA driver: a fork server must fork before CUDA is initialised, or its children cannot use it.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def emit(path: str, event: dict[str, Any]) -> None:
    """Append one event line and fsync it: a crash right after still leaves the event readable."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class LoadFailure(Exception):
    """The implementation could not be loaded: a usage problem the runner reports in one line."""


@dataclass
class Options:
    """What every batch of one implementation shares (the runner passes it on the command line)."""

    impl: str
    device: str = "cpu"
    seed: int = 0
    examples: int | None = None
    steps: int | None = None
    report_dir: str | None = None
    #: the slow tier (``Budget.slow``: the full base-layer matrix)
    slow: bool = False

    def budget(self) -> Any:
        from conformance.clauses.budget import Budget

        base = Budget()
        return Budget(
            property_examples=self.examples or base.property_examples,
            stateful_examples=self.examples or base.stateful_examples,
            stateful_steps=self.steps or base.stateful_steps,
            stateful_shrink_s=base.stateful_shrink_s,
            slow=self.slow,
        )


def prepare(opts: Options) -> tuple[Any, dict[str, Any]]:
    """Import torch and the checks, load the implementation; (impl, ``loaded`` event). Touches no CUDA."""
    import torch

    from conformance.quant.layers import quiet_int8_cast_notice

    quiet_int8_cast_notice()
    # clause checks use tiny shapes: one thread avoids oversubscribing small CI machines (and a fork
    # server with no intra-op thread pool forks safely)
    torch.set_num_threads(int(os.environ.get("CONFORMANCE_TORCH_THREADS", "1")))

    from conformance.clauses.clause import registry
    from conformance.clauses.interface import ImplementationNotFound, ImplementationUnsupported, declared
    from conformance.harness.loader import load

    registry()  # import every check module now: a fork server's children inherit them
    try:
        impl = load(opts.impl)
    except (ImplementationNotFound, ImplementationUnsupported) as exc:
        raise LoadFailure(str(exc)) from None
    except Exception as exc:
        raise LoadFailure(f"loading {opts.impl!r} failed: {type(exc).__name__}: {exc}") from None
    loaded = {
        "event": "loaded", "implementation": impl.name, "version": str(impl.version()),
        "methods": sorted(str(m) for m in declared(impl).methods),
        "capabilities": sorted(str(c) for c in declared(impl).capabilities),
        "unsupported": dict(getattr(impl, "unsupported", {}) or {}),
    }
    if opts.device == "cpu":  # the fingerprint needs torch, loaded here already; on CUDA it would initialise CUDA
        from conformance.harness.environment import fingerprint

        loaded["environment"] = fingerprint(opts.device)
    return impl, loaded


def run_batch(impl: Any, opts: Options, clause_ids: list[str], events: str) -> None:
    """Run the clauses in order, a ``start`` and a ``result`` event each."""
    from conformance.clauses.clause import registry
    from conformance.harness.execute import run_clause

    reg = registry()
    budget = opts.budget()
    for cid in clause_ids:
        emit(events, {"event": "start", "clause": cid, "t": time.time()})
        result = run_clause(reg[cid], impl, opts.device, opts.seed, budget=budget, report_dir=opts.report_dir,
                            target=opts.impl)
        emit(events, {"event": "result", **result.to_json()})


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--impl", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--report-dir", default=None)
    p.add_argument("--slow", action="store_true")


def options_argv(opts: Options) -> list[str]:
    """The command-line form of ``opts`` (what ``add_options`` parses back)."""
    argv = ["--impl", opts.impl, "--device", opts.device, "--seed", str(opts.seed)]
    if opts.examples:
        argv += ["--examples", str(opts.examples)]
    if opts.steps:
        argv += ["--steps", str(opts.steps)]
    if opts.report_dir:
        argv += ["--report-dir", opts.report_dir]
    if opts.slow:
        argv += ["--slow"]
    return argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.harness.worker")
    add_options(p)
    p.add_argument("--events", help="JSONL file the events are appended to (not with --serve)")
    p.add_argument("--clauses", default="", help="comma-separated clause IDs, in order")
    p.add_argument("--describe", action="store_true", help="only load the implementation and describe it")
    p.add_argument("--serve", action="store_true", help="be a fork server: commands on stdin, replies on stdout")
    args = p.parse_args(argv)
    opts = Options(args.impl, args.device, args.seed, args.examples, args.steps, args.report_dir, args.slow)
    if args.serve:
        from conformance.harness.zygote import serve

        return serve(opts)
    if not args.events:
        p.error("--events is required without --serve")
    try:
        impl, loaded = prepare(opts)
    except LoadFailure as exc:
        emit(args.events, {"event": "fatal", "message": str(exc)})
        return 3
    emit(args.events, loaded)
    if not args.describe:
        run_batch(impl, opts, [c for c in args.clauses.split(",") if c], args.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
