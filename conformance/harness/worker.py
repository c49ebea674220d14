"""The per-implementation worker process: runs clauses and appends one JSON event per line.

Started by ``conformance.harness.runner``; an implementation that segfaults, aborts or hangs takes
only this process down, and the runner records the clause as ``error`` and starts a new worker
for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _emit(path: str, event: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.harness.worker")
    p.add_argument("--impl", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--events", required=True)
    p.add_argument("--clauses", default="", help="comma-separated clause IDs, in order")
    p.add_argument("--describe", action="store_true", help="only load the implementation and describe it")
    args = p.parse_args(argv)

    import torch

    from conformance.quant.layers import quiet_int8_cast_notice

    quiet_int8_cast_notice()

    # clause checks use tiny shapes: one thread avoids oversubscribing small CI machines
    torch.set_num_threads(int(os.environ.get("CONFORMANCE_TORCH_THREADS", "1")))

    from conformance.harness.loader import load
    from conformance.spec.interface import ImplementationNotFound, ImplementationUnsupported

    try:
        impl = load(args.impl)
    except (ImplementationNotFound, ImplementationUnsupported) as exc:  # a usage problem for the parent
        _emit(args.events, {"event": "fatal", "message": str(exc)})
        return 3
    except Exception as exc:
        _emit(args.events, {"event": "fatal", "message": f"loading {args.impl!r} failed: {type(exc).__name__}: {exc}"})
        return 3
    _emit(args.events, {
        "event": "loaded", "implementation": impl.name, "version": str(impl.version()),
        "capabilities": sorted(impl.capabilities),
        "unsupported": dict(getattr(impl, "unsupported", {}) or {}),
    })
    if args.describe:
        return 0

    from conformance.harness.execute import run_clause
    from conformance.spec.clauses import registry

    reg = registry()
    for cid in [c for c in args.clauses.split(",") if c]:
        _emit(args.events, {"event": "start", "clause": cid, "t": time.time()})
        result = run_clause(reg[cid], impl, args.device, args.seed)
        _emit(args.events, {"event": "result", **result.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
