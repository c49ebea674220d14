"""Layer benchmarks through pytest-benchmark.

- ``test_smoke``: the quick matrix (256x256, 8 tokens, fp32) of every method (DoRA's too) on the CPU, part of the
  normal test run (a few seconds): every implementation and operation runs, is timed, and returns finite values.
- ``test_gpu``: the full matrix of ``conformance.bench.cases`` on CUDA, every method (``-m bench --device cuda``;
  select with ``-k``, e.g. ``-k dora``); rounds from ``$CONFORMANCE_BENCH_ROUNDS`` (default 20).

The timed call synchronises the device (pytest-benchmark's timer is ``perf_counter``); the L2 flush and
the untimed setup run in pytest-benchmark's ``setup`` hook. On a shared, oversubscribed CPU runner use
``--benchmark-timer=time.thread_time`` with ``CONFORMANCE_BENCH_CLOCK=thread`` (see baselines/bench/README.md). ``extra_info`` carries the case key, FLOPs,
minimal bytes and the peak floor; ``python -m conformance.bench`` gives the full derived table.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from conformance.bench import METHODS, roofline
from conformance.bench.cases import BenchCase, matrix
from conformance.bench.layers import inject_factor, with_slowdown
from conformance.bench.timing import L2Flusher

QUICK = matrix("cpu", quick=True, methods=METHODS)  # every method: DoRA's smoke too
FULL = matrix("cuda", quick=False, methods=METHODS)


def _check_finite(out: object) -> None:
    if isinstance(out, torch.Tensor):
        assert torch.isfinite(out.float()).all(), "benchmark output has NaN/Inf"


def _bench(benchmark, builder, case: BenchCase, device: str, rounds: int, warmup: int) -> None:
    warnings.simplefilter("ignore")
    prep = builder(device).prepare(case)
    factor = inject_factor()
    if factor:
        prep = with_slowdown(prep, factor, device)
    cuda = device == "cuda"
    flusher = L2Flusher(device) if cuda and case.op in ("fwd", "fwdbwd") else None

    def setup() -> None:
        if prep.setup:
            prep.setup()
        if flusher is not None:
            flusher()
        if cuda:
            torch.cuda.synchronize()

    def timed() -> object:
        out = prep.fn()
        if cuda:
            torch.cuda.synchronize()
        return out

    benchmark.group = case.group.rsplit("/", 1)[0] if case.op in ("fwd", "fwdbwd") else case.group
    benchmark.extra_info.update(key=case.key, impl=case.impl, op=case.op, shape=case.shape, tokens=case.tokens,
                                dtype=case.dtype, flops=roofline.flops(case), min_bytes=roofline.min_bytes(case),
                                inject_slowdown=factor)
    if cuda:
        peak = roofline.peak_for(torch.cuda.get_device_name())
        benchmark.extra_info["floor_peak_s"] = roofline.peak_floor_s(case, peak)
    slow = case.op in ("merge", "unmerge")
    out = benchmark.pedantic(timed, setup=setup, rounds=3 if slow else rounds, warmup_rounds=1 if slow else warmup,
                             iterations=1)
    _check_finite(out)


@pytest.mark.bench
@pytest.mark.parametrize("case", QUICK, ids=[c.key for c in QUICK])
def test_smoke(benchmark, bench_builder, case: BenchCase) -> None:
    torch.set_num_threads(1)  # a shared 2-core runner: one thread keeps the medians steady
    _bench(benchmark, bench_builder, case, "cpu", rounds=int(os.environ.get("CONFORMANCE_BENCH_ROUNDS", 25)),
           warmup=3)


@pytest.mark.gpu
@pytest.mark.bench
@pytest.mark.parametrize("case", FULL, ids=[c.key for c in FULL])
def test_gpu(benchmark, bench_builder, case: BenchCase) -> None:
    _bench(benchmark, bench_builder, case, "cuda", rounds=int(os.environ.get("CONFORMANCE_BENCH_ROUNDS", 20)),
           warmup=3)
