"""Decode (one token) in eager and CUDA-graph mode: host overhead and device time apart.

``python -m conformance.bench.decode_graph --out DIR [--impls bnb,reference,peft,litgpt] [--dtype bfloat16]``

The one-token forward of a 4-bit layer is host-bound: the GPU waits for Python to launch the next
kernel. Capturing the forward in a ``torch.cuda.CUDAGraph`` and replaying it removes the launch cost,
leaving the kernels' own time. Per shape and implementation this measures:

- ``eager_us``: wall time per call of back-to-back eager forwards (synchronised once per batch), i.e.
  what a decode loop pays; host-bound when it exceeds the device time;
- ``graph_us``: time per replay of the captured forward (CUDA events around a batch of replays): the
  device time plus the (tiny) replay launch;
- ``host_overhead_us`` = ``eager_us - graph_us``;
- ratios against the bare bnb layer in the same mode (``eager_vs_bnb``, ``graph_vs_bnb``).

A graph replay must give the eager output exactly (same kernels on the same static input):
``graph_matches_eager`` records it, and a capture that fails records its error instead of a time.
The layers are those of the benchmark matrix (``conformance.bench.layers``: NF4 + double quant, LoRA
r=16, adapters in the compute dtype, random B) — the reference stays plain PyTorch; capture happens
here, outside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conformance.harness.files import write_atomic

GRAPH_IMPLS = ("bnb", "reference", "peft", "litgpt")


def ratio_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``eager_vs_bnb`` / ``graph_vs_bnb`` to each record (against the bnb row of its shape and dtype)."""
    bare = {(r["shape"], r["dtype"]): r for r in records if r["impl"] == "bnb"}
    out = []
    for r in records:
        row = dict(r)
        b = bare.get((r["shape"], r["dtype"]))
        for mode in ("eager", "graph"):
            mine, ref = row.get(f"{mode}_us"), (b or {}).get(f"{mode}_us")
            row[f"{mode}_vs_bnb"] = round(mine / ref, 3) if mine and ref else None
        out.append(row)
    return out


def table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per (shape, implementation)."""
    head = ("| shape | impl | eager us | graph us | host overhead us | eager / bnb | graph / bnb | replay == eager |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]

    def f(v: Any, nd: int = 1) -> str:
        return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    for r in records:
        lines.append(f"| {r['shape']} | {r['impl']} | {f(r.get('eager_us'))} | {f(r.get('graph_us'))} | "
                     f"{f(r.get('host_overhead_us'))} | {f(r.get('eager_vs_bnb'), 2)} | {f(r.get('graph_vs_bnb'), 2)} | "
                     f"{r.get('graph_matches_eager', r.get('error', '–'))} |")
    return "\n".join(lines)


def _median_per_call(run_batch: Callable[[], float], batches: int, per_batch: int) -> tuple[float, float]:
    """(median, IQR) over ``batches`` of seconds per call."""
    samples = sorted(run_batch() / per_batch for _ in range(batches))
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [samples[0], samples[0], samples[-1]]
    return statistics.median(samples), q[2] - q[0]


def measure_one(layer: Any, x: Any, batches: int = 15, per_batch: int = 200) -> dict[str, Any]:
    """Eager and graph timings of ``layer(x)`` under ``torch.no_grad()`` on CUDA."""
    import torch

    rec: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(20):  # warm-up: module load, autotuning, allocator
            layer(x)
        torch.cuda.synchronize()

        def eager_batch() -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(per_batch):
                layer(x)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        med, iqr = _median_per_call(eager_batch, batches, per_batch)
        rec["eager_us"], rec["eager_iqr_us"] = med * 1e6, iqr * 1e6
        eager_out = layer(x).clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    layer(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = layer(x)
        except Exception as exc:  # a layer that cannot be captured is a finding, not a crash of the bench
            rec["error"] = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.synchronize()
            return rec
        graph.replay()
        torch.cuda.synchronize()
        rec["graph_matches_eager"] = bool(torch.equal(static_out, eager_out))

        def graph_batch() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        med, iqr = _median_per_call(graph_batch, batches, per_batch)
        rec["graph_us"], rec["graph_iqr_us"] = med * 1e6, iqr * 1e6
        rec["host_overhead_us"] = rec["eager_us"] - rec["graph_us"]
    return rec


def run(shapes: Sequence[tuple[int, int]], impls: Sequence[str], dtype: str = "bfloat16",
        progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every (shape, impl) record; an implementation that cannot be built records why."""
    import torch

    from conformance.quant.torchnames import dtype_of

    from .cases import BenchCase
    from .layers import make_adapter_layer, make_base

    progress = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    records = []
    for (i, o) in shapes:
        probe = BenchCase.make("bnb", "lora", 4, i, o, 1, dtype, "fwd")
        base = make_base(probe, "cuda")
        gen = torch.Generator(device="cuda").manual_seed(2)
        x = torch.randn(1, i, generator=gen, device="cuda", dtype=dtype_of(dtype))
        for impl in impls:
            rec: dict[str, Any] = {"shape": f"{i}x{o}", "impl": impl, "dtype": dtype, "tokens": 1,
                                   "quant": "nf4-dq", "rank": probe.rank}
            try:
                layer = base if impl == "bnb" else make_adapter_layer(probe.with_impl(impl), base)
            except Exception as exc:
                rec["error"] = f"not built: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                records.append(rec)
                progress(f"  {rec['shape']:>11} {impl:<10} {rec['error']}")
                continue
            rec.update(measure_one(layer, x))
            records.append(rec)
            progress(f"  {rec['shape']:>11} {impl:<10} eager {rec.get('eager_us', float('nan')):8.1f} us   "
                     f"graph {rec.get('graph_us', float('nan')):8.1f} us  {rec.get('error', '')}")
            del layer
        del base
        torch.cuda.empty_cache()
    return ratio_rows(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.bench.decode_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="baselines/bench", help="directory for decode-graph-<slug>.json")
    p.add_argument("--impls", default=",".join(GRAPH_IMPLS), help=f"comma-separated subset of {','.join(GRAPH_IMPLS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--shapes", default=None, help="e.g. 4096x4096,8192x28672 (default: the GPU matrix's shapes)")
    args = p.parse_args(argv)
    impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(impls) - set(GRAPH_IMPLS))
    if unknown:
        p.error(f"unknown implementation(s) {unknown}; choose from {', '.join(GRAPH_IMPLS)}")
    import torch

    if not torch.cuda.is_available():
        p.error("CUDA graphs need a CUDA device; torch.cuda.is_available() is False here")
    from conformance.quant.layers import quiet_int8_cast_notice

    from .cases import GPU_SHAPES
    from .runner import environment, slug

    quiet_int8_cast_notice()
    shapes = GPU_SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    records = run(shapes, impls, args.dtype)
    env = environment("cuda")
    doc = {"kind": "decode_graph", "environment": env, "records": records,
           "method": "eager: back-to-back calls, one sync per batch of 200, median of 15 batches; graph: "
                     "torch.cuda.CUDAGraph replays timed with CUDA events, same batches"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode-graph-{slug(env)}.json"
    write_atomic(path, json.dumps(doc, indent=1, default=str))
    print(f"GPU: {env.get('gpu', {}).get('name', env.get('gpu'))}")
    print(table(records))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
