"""Timers: CUDA events (device time) and a synchronising ``perf_counter`` (host / CPU time).

Method (``METHOD.md`` of the device machine, and the usual GPU benchmarking rules):

- warm-up calls first, so module loading, cuBLAS handle creation and autotuning stay out;
- before every timed round the L2 cache is flushed (a buffer twice the L2 size is overwritten), so a
  decode step that reads an 8 MB packed weight is not served from a 50 MB L2;
- an untimed ``setup`` runs before each round (e.g. dropping ``.grad``), also outside the timing;
- rounds continue until the median is known to ``target_ci`` (relative half-width of its ~95%
  confidence interval, from the interquartile range) or a round / time cap is reached;
- the summary is the median (robust to the odd slow round) with min/max/IQR/stddev and rounds.

CUDA events measure the GPU's time for the queued work; launch gaps count only when the GPU runs
dry, so a host-bound call (decode in eager mode) also gets a host timing (``time_host``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# Relative half-width of a 95% CI of the median: 1.96 * sqrt(pi/2) * sigma / sqrt(n), sigma ~ IQR/1.349.
_MEDIAN_SE_FACTOR = math.sqrt(math.pi / 2) / 1.349


@dataclass
class Timing:
    """Per-round samples (seconds) and their summary."""

    samples: list[float] = field(repr=False)
    timer: str = "perf_counter"

    @property
    def rounds(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 4:
            return max(self.samples) - min(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]

    @property
    def stddev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def ci_rel(self) -> float:
        """Relative half-width of the ~95% confidence interval of the median."""
        return ci_rel(self.median, self.iqr, self.rounds)

    def summary(self) -> dict[str, Any]:
        return {
            "timer": self.timer, "rounds": self.rounds, "median_s": self.median, "min_s": min(self.samples),
            "max_s": max(self.samples), "mean_s": statistics.fmean(self.samples), "iqr_s": self.iqr,
            "stddev_s": self.stddev, "iqr_rel": self.iqr / self.median if self.median else 0.0,
            "ci_rel": self.ci_rel,
        }


def ci_rel(median: float, iqr: float, rounds: int) -> float:
    """Relative half-width of a ~95% CI of a median from its IQR (normal approximation)."""
    if rounds <= 1 or median <= 0:
        return math.inf
    return 1.96 * _MEDIAN_SE_FACTOR * iqr / math.sqrt(rounds) / median


def median_se(median: float, iqr: float, rounds: int) -> float:
    """Standard error of a median estimated from the IQR of ``rounds`` samples (absolute)."""
    if rounds <= 1:
        return math.inf
    return _MEDIAN_SE_FACTOR * iqr / math.sqrt(rounds)


@dataclass
class Budget:
    """How long to time one case."""

    warmup: int = 3
    min_rounds: int = 10
    max_rounds: int = 200
    max_seconds: float = 2.0
    target_ci: float = 0.02
    flush_l2: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class L2Flusher:
    """Overwrites a buffer twice the size of the L2 cache (H100: 50 MB) to evict it."""

    def __init__(self, device: torch.device | str) -> None:
        dev = torch.device(device)
        size = 64 << 20
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            size = max(size, 2 * int(getattr(props, "L2_cache_size", 50 << 20)))
        self.buf = torch.empty(size, dtype=torch.uint8, device=dev) if dev.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


CLOCK_ENV = "CONFORMANCE_BENCH_CLOCK"


def host_clock() -> Callable[[], float]:
    """The CPU timer: ``perf_counter`` (wall), or ``thread_time`` with ``$CONFORMANCE_BENCH_CLOCK=thread``.

    On a shared, oversubscribed runner (other jobs on the same cores) wall time measures the load as
    much as the code; the calling thread's CPU time does not count the time it was preempted, so with
    ``torch.set_num_threads(1)`` it isolates the code's own work (pytest-benchmark:
    ``--benchmark-timer=time.thread_time``). Not for CUDA: the GPU's time is not the thread's.
    """
    return time.thread_time if os.environ.get(CLOCK_ENV, "").strip() == "thread" else time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _enough(samples: list[float], budget: Budget, started: float) -> bool:
    n = len(samples)
    if n < budget.min_rounds:
        return False
    if n >= budget.max_rounds or time.perf_counter() - started > budget.max_seconds:
        return True
    t = Timing(samples)
    return t.ci_rel <= budget.target_ci


def _warm_up(fn: Callable[[], Any], budget: Budget, setup: Callable[[], Any] | None, dev: torch.device) -> None:
    for _ in range(budget.warmup):
        if setup:
            setup()
        fn()
    _sync(dev)


def time_cuda(fn: Callable[[], Any], budget: Budget, setup: Callable[[], Any] | None = None,
              device: torch.device | str = "cuda", flusher: L2Flusher | None = None) -> Timing:
    """Device time of ``fn`` per round with CUDA events (flush + setup untimed before each round)."""
    dev = torch.device(device)
    flusher = flusher if flusher is not None else (L2Flusher(dev) if budget.flush_l2 else None)
    _warm_up(fn, budget, setup, dev)
    samples: list[float] = []
    started = time.perf_counter()
    batch = max(1, min(budget.min_rounds, 10))
    while not _enough(samples, budget, started):
        events = []
        for _ in range(batch):
            if setup:
                setup()
            if flusher is not None and budget.flush_l2:
                flusher()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(dev)
        samples.extend(s.elapsed_time(e) / 1e3 for s, e in events)
    return Timing(samples, timer="cuda_event")


def time_host(fn: Callable[[], Any], budget: Budget, setup: Callable[[], Any] | None = None,
              device: torch.device | str = "cpu", flusher: L2Flusher | None = None) -> Timing:
    """Wall time of ``fn`` per round with ``perf_counter``, synchronising the device before and after.

    On the CPU the clock is :func:`host_clock` (wall by default, thread CPU time on request).
    """
    dev = torch.device(device)
    clock = time.perf_counter if dev.type == "cuda" else host_clock()
    _warm_up(fn, budget, setup, dev)
    samples: list[float] = []
    started = time.perf_counter()
    while not _enough(samples, budget, started):
        if setup:
            setup()
        if flusher is not None and budget.flush_l2:
            flusher()
        _sync(dev)
        t0 = clock()
        fn()
        _sync(dev)
        samples.append(clock() - t0)
    return Timing(samples, timer="perf_counter_sync" if clock is time.perf_counter else "thread_time")


def measure(fn: Callable[[], Any], budget: Budget, setup: Callable[[], Any] | None = None,
            device: torch.device | str = "cpu", flusher: L2Flusher | None = None) -> Timing:
    """CUDA events on a GPU, the synchronising perf_counter timer elsewhere."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, budget, setup, device, flusher)
    return time_host(fn, budget, setup, device, flusher)


def spin(seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
    """Busy-wait ``seconds`` on ``clock`` (precise to ~1 us, unlike time.sleep): only to inject a slowdown."""
    end = clock() + seconds
    while clock() < end:
        pass
