"""Walk the benchmark matrix, time every case, derive the figures, write the results.

A result file (``conformance-bench/1``, documented in ``baselines/bench/README.md``) holds the
environment fingerprint, the datasheet peak used, and one record per case: the timing summary
(median, spread, rounds), tokens/s, achieved TFLOP/s and GB/s, the measured and peak floors and the
fraction of each, peak memory, stored bytes, clone overhead and ratios to PEFT and to the bare layer.

A case whose implementation is ``NAME@PYTHON`` is timed in that interpreter (``run_elsewhere``): it runs this
module's own entry (``python -m conformance.bench.runner --cases IN.json --out OUT.json``), which times the cases
there with ``NAME`` found by the runner's loader and writes the records as JSON; the interpreter is checked
first as the conformance runner checks one (``conformance.harness.runner.interpreter_packages``), and the
result's ``elsewhere`` holds its packages and fingerprint.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conformance.clauses.interface import ImplementationUnsupported
from conformance.core.vocabulary import LORA_LIKE
from conformance.harness.environment import fingerprint, slug
from conformance.harness.files import write_atomic

from . import memory, roofline
from .cases import BenchCase
from .layers import Builder, inject_factor, with_slowdown
from .timing import Budget, L2Flusher, Timing, measure, time_host

FORMAT = "conformance-bench/1"
MAIN_GROUP_PREFIX = "lora-nf4-dq/fwdbwd/4096x4096/t4096/"


def budget_for(case: BenchCase, device: str, quick: bool) -> Budget:
    """Warm-up and round caps: merges are slow (seconds on big layers), the CPU smoke is short."""
    if case.op in ("merge", "unmerge"):
        return Budget(warmup=1, min_rounds=3, max_rounds=5 if not quick else 4, max_seconds=8.0, flush_l2=False)
    if device != "cuda":
        return Budget(warmup=3, min_rounds=15, max_rounds=60 if quick else 200, max_seconds=0.25 if quick else 2.0,
                      target_ci=0.02, flush_l2=False)
    return Budget(warmup=3, min_rounds=10, max_rounds=300, max_seconds=0.6, target_ci=0.02, flush_l2=True)


def environment(device: str) -> dict[str, Any]:
    """The run's fingerprint (``conformance.harness.environment``, as in conformance reports)."""
    return fingerprint(device)


def run_case(builder: Builder, case: BenchCase, device: str, quick: bool, flusher: L2Flusher | None,
             inject: float) -> dict[str, Any]:
    """Time one case; never raises (an error becomes the record's ``status``)."""
    rec: dict[str, Any] = case.to_dict()
    try:
        prep = builder.prepare(case)
        if inject:
            prep = with_slowdown(prep, inject, device)
        budget = budget_for(case, device, quick)
        timing = measure(prep.fn, budget, prep.setup, device, flusher)
        rec["timing"] = timing.summary()
        rec["_samples"] = timing.samples
        if device == "cuda" and case.tokens == 1 and case.op in ("fwd", "fwdbwd"):
            # decode is host-bound in eager mode: the synchronising wall-clock time is what a user waits
            host = time_host(prep.fn, Budget(warmup=2, min_rounds=10, max_rounds=50, max_seconds=0.2,
                                             flush_l2=True), prep.setup, device, flusher)
            rec["host_timing"] = host.summary()
        if case.op in ("fwd", "fwdbwd"):
            if prep.setup:
                prep.setup()
            rec["memory"] = memory.peak_memory(prep.fn, device)
        rec["static_bytes"] = prep.static_bytes
        if prep.notes:
            rec["notes"] = prep.notes
        rec["status"] = "ok"
    except ImplementationUnsupported as exc:  # what the implementation declares it lacks: not timed, not an error
        rec["status"] = "skipped"
        rec["error"] = str(exc)
    except Exception as exc:
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=6)
        builder.discard()  # what failed may have broken the shared base: the next case builds a fresh one
    return rec


def derive(records: list[dict[str, Any]], peak: roofline.Peak | None) -> None:
    """Add the derived figures in place (needs the whole run: floors and ratios join records)."""
    by_key = {r["key"]: r for r in records if r.get("status") == "ok"}
    for r in records:
        if r.get("status") != "ok":
            continue
        case = BenchCase.from_dict(r)
        med = r["timing"]["median_s"]
        f, b = roofline.flops(case), roofline.min_bytes(case)
        r["flops"], r["min_bytes"] = f, b
        if case.op in ("fwd", "fwdbwd"):
            r["tokens_per_s"] = case.tokens / med
            r["tflops"] = f / med / 1e12
            r["gbps"] = b / med / 1e9
            floor_impl = "floor-bare" if case.impl in roofline.BARE_IMPLS else "floor"
            fl = by_key.get(f"{case.group}/{floor_impl}") if case.method in LORA_LIKE else None
            if fl is not None and case.impl != floor_impl:
                fm = fl["timing"]["median_s"]
                r["floor_measured_s"] = fm
                r["x_measured_floor"] = med / fm
                r["frac_measured_floor"] = fm / med
            pf = roofline.peak_floor_s(case, peak)
            if pf is not None:
                r["floor_peak_s"] = pf
                r["frac_peak_floor"] = pf / med
                r["x_peak_floor"] = med / pf
        noclone = f"{case.impl}-noclone" if case.impl in ("reference", "reference-v0") else None
        for other, name in (("peft", "x_peft"), ("bnb", "x_bnb"), (noclone, "x_noclone")):
            o = by_key.get(f"{case.group}/{other}") if other else None
            if o is not None and o is not r:
                r[name] = med / o["timing"]["median_s"]
                if "host_timing" in r and "host_timing" in o:
                    r[name + "_host"] = r["host_timing"]["median_s"] / o["host_timing"]["median_s"]
        if "x_noclone" in r:
            r["clone_overhead_pct"] = 100.0 * (r["x_noclone"] - 1.0)


def memory_table(device: str, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Bytes/param of stored layers (NF4, NF4+DQ, FP4, int8) vs the format's prediction."""
    from conformance.quant.layers import make_base_layer

    rows = []
    for (i, o) in shapes:
        for bits, qt, dq in ((4, "nf4", False), (4, "nf4", True), (4, "fp4", False), (8, None, False)):
            kw = {"quant_type": qt, "double_quant": dq} if bits == 4 else {}
            # random normal weights; int8 must start on the CPU (Int8Params quantizes on a move from it)
            w = torch.randn(o, i, device=device if bits == 4 else "cpu", dtype=torch.bfloat16)
            layer = make_base_layer(i, o, bits=bits, bias=False, device=device, weight=w,
                                    weight_dtype=torch.bfloat16, compute_dtype=torch.bfloat16, **kw)
            m = memory.bytes_per_param(layer)
            theory = memory.theoretical_bits(bits, 64, dq, in_features=i)
            rows.append({"shape": f"{i}x{o}", "bits": bits, "quant_type": qt or "int8", "double_quant": dq,
                         **{k: m[k] for k in ("params", "bytes", "parts", "bytes_per_param", "bits_per_param",
                                              "stats_bits_per_param")},
                         "theory_bits_per_param": theory["total"], "theory_stats_bits": theory["stats"]})
            del layer, w
    return rows


def repeat_spread(builder: Builder, cases: list[BenchCase], device: str, quick: bool, flusher: L2Flusher | None,
                  repeats: int) -> list[dict[str, Any]]:
    """Time the same cases ``repeats`` times (independently) and report the spread of the medians."""
    out = []
    for case in cases:
        meds = []
        for _ in range(repeats):
            rec = run_case(builder, case, device, quick, flusher, 0.0)
            if rec["status"] != "ok":
                break
            meds.append(rec["timing"]["median_s"])
        if len(meds) >= 2:
            m = sorted(meds)[len(meds) // 2]
            out.append({"key": case.key, "medians_s": meds, "spread_rel": (max(meds) - min(meds)) / m})
    return out


def split_impl(impl: str) -> tuple[str, str | None]:
    """(name, interpreter) of ``NAME@PYTHON`` (the runner's ``--impl`` form); (impl, None) for this interpreter."""
    name, sep, python = impl.partition("@")
    return (name, python) if sep else (impl, None)


def time_cases(builder: Builder, cases: list[BenchCase], device: str, quick: bool, deadline: float | None = None,
               passes: int = 1, log: Callable[[str], None] = print, partial_path: Path | None = None
               ) -> list[dict[str, Any]]:
    """One record per case, timed in this process, in order; cases left when ``deadline`` (``perf_counter``)
    has passed are ``skipped``. ``passes > 1`` walks the cases that many times and pools each case's rounds."""
    flusher = L2Flusher(device) if device == "cuda" else None
    inject = inject_factor()
    records: list[dict[str, Any]] = []
    pooled: dict[str, list[float]] = {}
    for extra in range(passes - 1):  # earlier passes only contribute rounds to the pooled samples
        for case in cases:
            rec = run_case(builder, case, device, quick, flusher, inject)
            if rec["status"] == "ok":
                pooled.setdefault(case.key, []).extend(rec["_samples"])
        log(f"pass {extra + 1}/{passes} done")
    for n, case in enumerate(cases):
        if deadline is not None and time.perf_counter() > deadline:
            records.append({**case.to_dict(), "status": "skipped", "error": "time budget of the run exhausted"})
            continue
        rec = run_case(builder, case, device, quick, flusher, inject)
        records.append(rec)
        if rec["status"] == "ok":
            if case.key in pooled:
                rec["timing"] = Timing(pooled[case.key] + rec["_samples"], rec["timing"]["timer"]).summary()
                rec["timing"]["passes"] = passes
            t = rec["timing"]
            log(f"[{n + 1}/{len(cases)}] {case.key:70s} {t['median_s'] * 1e3:10.4f} ms  ci {t['ci_rel']:.3f}  "
                f"n={t['rounds']}")
        else:
            log(f"[{n + 1}/{len(cases)}] {case.key:70s} {rec['status'].upper()} {rec['error'][:200]}")
        if partial_path is not None and (n % 25 == 0):
            write_atomic(partial_path, json.dumps({"format": FORMAT, "partial": True, "results": records}, default=str))
    return records


def _elsewhere_records(cases: list[BenchCase], status: str, error: str) -> list[dict[str, Any]]:
    return [{**c.to_dict(), "status": status, "error": error} for c in cases]


def run_elsewhere(python: str, cases: list[BenchCase], device: str, quick: bool, max_seconds: float | None = None,
                  passes: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time ``cases`` (all ``NAME@python``) in the interpreter ``python``: (records, its fingerprint).

    The child runs ``python -m conformance.bench.runner`` on the cases with ``NAME`` alone, its progress on
    this process' stdout; its records come back with the case's own ``impl`` and ``key``. A child that fails
    leaves every case of it as ``error`` with the child's exit and last stderr line."""
    from conformance.harness import interrupts, processes

    if max_seconds is not None and max_seconds <= 0:
        return _elsewhere_records(cases, "skipped", "time budget of the run exhausted"), {}
    with tempfile.TemporaryDirectory(prefix="conformance-bench-") as tmp:
        spec, out, errlog = (os.path.join(tmp, f) for f in ("cases.json", "records.json", "stderr.log"))
        there = [c.with_impl(split_impl(c.impl)[0]) for c in cases]
        with open(spec, "w", encoding="utf-8") as fh:
            json.dump([c.to_dict() for c in there], fh)
        cmd = [python, "-m", "conformance.bench.runner", "--cases", spec, "--out", out, "--device", device,
               "--passes", str(passes), *(["--quick"] if quick else []),
               *(["--max-seconds", f"{max_seconds:g}"] if max_seconds is not None else [])]
        env = dict(os.environ, BITSANDBYTES_NOWELCOME="1")
        with open(errlog, "w", encoding="utf-8") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        key = processes.started(proc)  # a second Ctrl-C kills it with the rest
        try:
            proc.wait()
        finally:  # Ctrl-C here: the child (a session of its own) must not outlive the run
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            interrupts.forget(key)
        if proc.returncode != 0 or not os.path.isfile(out):
            last = (processes.tail(errlog, 1) or ["no output"])[0]
            return _elsewhere_records(cases, "error", f"the bench in {python} {processes.describe_exit(proc.returncode)}"
                                      f": {last}"), {}
        with open(out, encoding="utf-8") as fh:
            got = json.load(fh)
    records = got["results"]
    for case, rec in zip(cases, records, strict=True):
        rec.update(impl=case.impl, key=case.key, python=python)
    return records, got["environment"]


def run(cases: list[BenchCase], device: str = "cpu", quick: bool = False, max_seconds: float | None = None,
        repeats: int = 0, log: Callable[[str], None] = print, mem_shapes: list[tuple[int, int]] | None = None,
        partial_path: Path | None = None, passes: int = 1) -> dict[str, Any]:
    """Run ``cases`` (in order, until ``max_seconds``), returning the result document.

    ``passes > 1`` walks the whole matrix that many times and pools each case's rounds: on a shared
    machine whose load drifts over seconds, every case then samples the same mix of load. Cases of
    ``NAME@PYTHON`` run in that interpreter after the others (``run_elsewhere``); a missing or unusable
    interpreter is a ``conformance.harness.runner.UsageError`` before anything is timed.
    """
    from conformance.harness.runner import interpreter_packages

    warnings.simplefilter("ignore")
    here = [c for c in cases if split_impl(c.impl)[1] is None]
    there: dict[str, list[BenchCase]] = {}
    for c in cases:
        python = split_impl(c.impl)[1]
        if python is not None:
            there.setdefault(python, []).append(c)
    elsewhere = {python: {"packages": interpreter_packages(python)} for python in there}  # UsageError first
    env = environment(device)
    gpu_name = env.get("gpu", {}).get("name") if device == "cuda" else None
    peak = roofline.peak_for(gpu_name)
    builder = Builder(device)
    flusher = L2Flusher(device) if device == "cuda" else None
    started = time.perf_counter()
    deadline = None if max_seconds is None else started + max_seconds
    by_key = {r["key"]: r for r in time_cases(builder, here, device, quick, deadline, passes, log, partial_path)}
    for python, group in there.items():
        left = None if deadline is None else deadline - time.perf_counter()
        log(f"timing {len(group)} case(s) in {python}")
        recs, elsewhere[python]["environment"] = run_elsewhere(python, group, device, quick, left, passes)
        by_key.update((r["key"], r) for r in recs)
    records = [by_key[c.key] for c in cases]
    skipped = sum(r["status"] == "skipped" for r in records)
    elapsed = time.perf_counter() - started
    spread = []
    if repeats:
        main = [c for c in cases if c.group.startswith(MAIN_GROUP_PREFIX) and c.impl in ("reference", "peft", "floor")]
        if quick:
            main = [c for c in cases if c.op == "fwdbwd" and c.method == "lora" and c.bits == 4
                    and c.impl in ("reference", "peft", "floor")]
        spread = repeat_spread(builder, main, device, quick, flusher, repeats)
    del builder
    gc.collect()
    mem = memory_table(device, mem_shapes or [(c.in_features, c.out_features) for c in cases[:1]])
    for r in records:
        r.pop("_samples", None)
    derive(records, peak)
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "slug": slug(env),
        "config": {"device": device, "quick": quick, "max_seconds": max_seconds, "inject_slowdown": inject_factor(),
                   "passes": passes, "cases": len(cases), "skipped": skipped, "elapsed_s": elapsed,
                   "budget": budget_for(cases[0], device, quick).to_dict() if cases else None},
        "peak": None if peak is None else {"name": peak.name, "flops": peak.flops, "bandwidth": peak.bandwidth},
        "results": records,
        **({"elsewhere": elsewhere} if elsewhere else {}),
        "repeat_spread": spread,
        "memory": mem,
        "memory_theory": {
            "nf4_bits": memory.theoretical_bits(4, 64, False)["total"],
            "nf4_dq_bits": memory.theoretical_bits(4, 64, True)["total"],
            "double_quant_saving_bits": memory.double_quant_saving_bits(),
            "llama7b_nf4_dq_gib": memory.model_gib(6.74e9, memory.theoretical_bits(4, 64, True)["total"]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """The timing entry ``run_elsewhere`` starts in another interpreter: time the cases of a JSON file there."""
    p = argparse.ArgumentParser(prog="python -m conformance.bench.runner", description=main.__doc__)
    p.add_argument("--cases", required=True, help="JSON list of BenchCase records (BenchCase.to_dict)")
    p.add_argument("--out", required=True, help="where the records and this interpreter's fingerprint go (JSON)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=None)
    args = p.parse_args(argv)
    from conformance.quant.layers import quiet_int8_cast_notice

    quiet_int8_cast_notice()
    warnings.simplefilter("ignore")
    if args.device == "cpu" and args.quick:
        torch.set_num_threads(1)  # as ``python -m conformance.bench --quick``
    with open(args.cases, encoding="utf-8") as fh:
        cases = [BenchCase.from_dict(d) for d in json.load(fh)]
    deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
    records = time_cases(Builder(args.device), cases, args.device, args.quick, deadline, args.passes)
    for r in records:
        r.pop("_samples", None)
    write_atomic(Path(args.out), json.dumps({"environment": environment(args.device), "results": records},
                                            default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
