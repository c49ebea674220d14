"""Run clauses for several implementations, each in its own worker process.

Isolation: an implementation's crash (segfault, abort), hang (per-clause timeout) or exception
becomes outcome ``error`` for that clause, with its message, and the run goes on: a new worker is
started for the clauses left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conformance.harness import xfails as xf
from conformance.harness.results import Result, exit_status  # noqa: F401  (re-exported)
from conformance.spec.clauses import Clause


class UsageError(Exception):
    """Bad usage (unknown implementation, unreadable file, ...): the CLI prints it and exits 2."""


@dataclass
class ImplInfo:
    name: str  # the implementation's declared name (what reports and xfail files use)
    target: str = ""  # what --impl said (built-in name, entry point or package.module:attr)
    version: str = "unknown"
    capabilities: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)


Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _worker_cmd(impl: str, device: str, seed: int, events: str, clauses: Sequence[str], describe: bool) -> list[str]:
    cmd = [sys.executable, "-m", "conformance.harness.worker", "--impl", impl, "--device", device, "--seed", str(seed),
           "--events", events]
    if describe:
        cmd.append("--describe")
    else:
        cmd += ["--clauses", ",".join(clauses)]
    return cmd


def _read_events(path: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with open(path, encoding="utf-8") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    complete, _, _rest = data.rpartition("\n")
    if not complete:
        return [], offset
    events = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return events, offset + len(complete.encode("utf-8")) + 1


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a segfault leaves a Python stack in the worker's stderr
    env.setdefault("BITSANDBYTES_NOWELCOME", "1")
    return env


def describe(impl: str, timeout_s: float = 300.0) -> ImplInfo:
    """Load an implementation in a worker; UsageError with a one-line message if it cannot be loaded."""
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        events = os.path.join(tmp, "events.jsonl")
        try:
            proc = subprocess.run(_worker_cmd(impl, "cpu", 0, events, [], True), capture_output=True, text=True,
                                  timeout=timeout_s, env=_env())
        except subprocess.TimeoutExpired:
            raise UsageError(f"implementation {impl!r} did not load within {timeout_s:.0f}s") from None
        evs, _ = _read_events(events, 0)
    for ev in evs:
        if ev["event"] == "fatal":
            raise UsageError(ev["message"])
        if ev["event"] == "loaded":
            return ImplInfo(ev["implementation"], impl, ev["version"], ev["capabilities"], ev.get("unsupported", {}))
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    raise UsageError(f"implementation {impl!r} could not be loaded (worker exit {proc.returncode}): {tail[0]}")


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def run_implementation(
    impl: str,
    clauses: Sequence[Clause],
    *,
    device: str = "cpu",
    seed: int = 0,
    timeout_scale: float = 1.0,
    progress: Progress = _stderr,
    label: str | None = None,
) -> list[Result]:
    """Run ``clauses`` for one implementation in worker processes; never raises for the implementation's faults.

    ``impl`` is what to load (``--impl``); results carry the implementation's declared name.
    """
    label = label or impl
    by_id = {c.id: c for c in clauses}
    todo = [c.id for c in clauses]
    results: list[Result] = []
    total = len(todo)
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        attempt = 0
        while todo:
            attempt += 1
            events = os.path.join(tmp, f"events-{attempt}.jsonl")
            errlog = open(os.path.join(tmp, f"stderr-{attempt}.log"), "w+", encoding="utf-8")  # noqa: SIM115
            proc = subprocess.Popen(_worker_cmd(impl, device, seed, events, todo, False), stdout=subprocess.DEVNULL,
                                    stderr=errlog, env=_env())
            offset, current, started = 0, None, time.monotonic()
            try:
                while True:
                    evs, offset = _read_events(events, offset)
                    for ev in evs:
                        if ev["event"] == "fatal":
                            raise UsageError(ev["message"])
                        if ev["event"] == "start":
                            current, started = ev["clause"], time.monotonic()
                        elif ev["event"] == "result":
                            res = Result.from_json(ev)
                            results.append(res)
                            todo.remove(res.clause)
                            current = None
                            progress(f"[{label}] {len(results)}/{total} {res.clause:<34} {res.outcome:<8} "
                                     f"({res.duration_s:.1f}s)")
                    if proc.poll() is not None:
                        evs, offset = _read_events(events, offset)
                        if evs:
                            continue  # drain the last events first
                        break
                    if current is not None:
                        limit = by_id[current].timeout_s * timeout_scale
                        if time.monotonic() - started > limit:
                            proc.kill()
                            proc.wait()
                            res = Result(current, label, "error", f"timed out after {limit:.0f}s (worker killed)",
                                         limit, level=by_id[current].level, device=device)
                            results.append(res)
                            todo.remove(current)
                            progress(f"[{label}] {len(results)}/{total} {current:<34} error    (timeout {limit:.0f}s)")
                            current = None
                            break
                    time.sleep(0.05)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if current is not None:
                errlog.seek(0)
                tail = [ln for ln in errlog.read().splitlines() if ln.strip()][-3:]
                msg = f"worker {_describe_exit(proc.returncode)} while running this clause"
                if tail:
                    msg += ": " + " | ".join(tail)
                results.append(Result(current, label, "error", msg, time.monotonic() - started,
                                      level=by_id[current].level, device=device))
                todo.remove(current)
                progress(f"[{label}] {len(results)}/{total} {current:<34} error    ({_describe_exit(proc.returncode)})")
            elif proc.returncode not in (0, None) and todo:
                errlog.seek(0)
                tail = (errlog.read().strip().splitlines() or ["no output"])[-1]
                for cid in todo:
                    results.append(Result(cid, label, "error", f"worker {_describe_exit(proc.returncode)} before this "
                                          f"clause started: {tail}", level=by_id[cid].level, device=device))
                todo = []
            errlog.close()
    order = {c.id: i for i, c in enumerate(clauses)}
    return sorted(results, key=lambda r: order[r.clause])


def apply_xfails(results: list[Result], entries: list[xf.Xfail], strict: bool = True,
                 progress: Progress = _stderr) -> None:
    """Outcomes after the xfail entries, by the rule pytest uses too (``conformance.harness.xfails.resolve``);
    entries that matched nothing are warned about."""
    for msg in xf.apply(results, entries, strict=strict):
        progress(f"warning: {msg}")
