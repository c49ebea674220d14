"""Run clauses for several implementations, each in its own worker processes; never lose a verdict.

Isolation: an implementation's crash (segfault, abort), hang (per-clause timeout) or exception
becomes outcome ``error`` for that clause, with its message, and a fresh worker carries on with the
clauses left (forked from the implementation's fork server: see ``conformance.harness.processes``).
Ctrl-C raises ``Interrupted`` carrying the results so far: SIGINT is only noted while a run is under
way and acted on where unwinding is safe (``conformance.harness.interrupts``), so cleanup never
blocks on a lock the interrupt left held; the worker is killed, the fork server stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from conformance.clauses.clause import Clause
from conformance.harness import interrupts, processes
from conformance.harness import xfails as xf
from conformance.harness.results import Result, exit_status  # noqa: F401  (re-exported)
from conformance.harness.worker import Options


class UsageError(Exception):
    """Bad usage (unknown implementation, unreadable file, ...): the CLI prints it and exits 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``results`` holds every verdict reached before it."""

    def __init__(self, results: list[Result]) -> None:
        super().__init__("interrupted")
        self.results = results


@dataclass
class ImplInfo:
    name: str  # the implementation's declared name (what reports and xfail files use)
    target: str = ""  # what --impl said (built-in name, entry point or package.module:attr)
    version: str = "unknown"
    capabilities: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    python: str = ""  # the interpreter its workers ran in, when not this one (``--impl NAME@PYTHON``)
    packages: dict[str, str] = field(default_factory=dict)  # versions installed there (interpreter_packages)
    environment: dict = field(default_factory=dict)  # its workers' fingerprint (CPU runs; see worker.prepare)
    methods: list[str] = field(default_factory=list)  # the adapter methods it declares (``Method`` names)


#: Packages whose versions describe an implementation's own environment (``--impl NAME@PYTHON``).
ENV_PACKAGES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "litgpt", "lightning",
                "huggingface-hub", "adapters")
_PROBE = ("import json, sys\nfrom importlib import metadata\nimport conformance\n"
          "import conformance.harness.worker, torch, bitsandbytes, hypothesis\nv = {}\n"
          "for p in sys.argv[1:]:\n    try: v[p] = metadata.version(p)\n"
          "    except metadata.PackageNotFoundError: pass\n"
          "print(json.dumps({'conformance': conformance.__file__, 'python': sys.version.split()[0], 'packages': v}))")


def interpreter_packages(python: str, timeout_s: float = 120.0) -> dict[str, str]:
    """Versions of ENV_PACKAGES installed in ``python`` (plus ``python``); UsageError if it cannot run the suite.

    The interpreter must exist, run, and import ``conformance`` (its workers run
    ``python -m conformance.harness.worker``); the error says how to install it there.
    """
    import json
    import shutil

    path = shutil.which(python) if os.sep not in python else python
    if not path or not os.path.isfile(path):
        raise UsageError(f"interpreter {python} does not exist")
    if not os.access(path, os.X_OK):
        raise UsageError(f"interpreter {python} is not executable")
    try:
        proc = subprocess.Popen([path, "-c", _PROBE, *ENV_PACKAGES], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"interpreter {python} cannot be run: {exc}") from None
    key = processes.started(proc)
    try:
        stdout, stderr = _communicate(proc, timeout_s)
    except subprocess.TimeoutExpired:
        raise UsageError(f"interpreter {python} cannot be run: no answer within {timeout_s:g} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        interrupts.forget(key)
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'conformance'" in stderr:
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            raise UsageError(f"interpreter {python} cannot import conformance ({last}); install it there: "
                             f"{python} -m pip install --no-deps -e {root}")
        raise UsageError(f"interpreter {python} cannot run the suite's workers ({last}); install the suite's "
                         f"dependencies there (torch, bitsandbytes, hypothesis)")
    got = json.loads(stdout.strip().splitlines()[-1])
    return {"python": got["python"], **got["packages"]}


def _communicate(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """``proc.communicate`` in short slices, acting on a Ctrl-C between them (TimeoutExpired past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        interrupts.check()
        try:
            return proc.communicate(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise


Progress = Callable[[str], None]
#: a clause running this long without a result is "hung" for ``interrupts.point`` (tests only: no verdict uses it)
HUNG_S = 1.0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _info(target: str, ev: dict) -> ImplInfo:
    return ImplInfo(ev["implementation"], target, ev["version"], ev["capabilities"], ev.get("unsupported", {}),
                    environment=ev.get("environment") or {}, methods=ev.get("methods", []))


#: the slow tier runs a tiered clause over the full base-layer product (``Clause.tiered``), tens of times the cases
#: of its pairwise covering (4-bit: 2112 bases against 36): its time limit is this many times the clause's own (an
#: explicit ``--timeout`` still wins)
SLOW_TIER_TIMEOUT_SCALE = 10.0


@dataclass
class RunConfig:
    """What one run passes to every worker (besides the implementation)."""

    device: str = "cpu"
    seed: int = 0
    examples: int | None = None  # property and stateful examples per case (None: the Budget default)
    steps: int | None = None  # stateful steps per example
    report_dir: str | None = None  # where checks write reproducers
    timeout: float | None = None  # seconds per clause, overriding every Clause.timeout_s
    timeout_scale: float = 1.0  # multiplies Clause.timeout_s (not an explicit timeout)
    slow: bool = False  # the slow tier: the full base-layer matrix (``Budget.slow``)

    def options(self, impl: str) -> Options:
        return Options(impl, self.device, self.seed, self.examples, self.steps, self.report_dir, self.slow)

    def limit(self, clause: Clause) -> float:
        if self.timeout is not None:
            return self.timeout
        tier = SLOW_TIER_TIMEOUT_SCALE if self.slow and clause.tiered else 1.0
        return clause.timeout_s * self.timeout_scale * tier


class Implementation:
    """A loaded implementation (its fork server), ready to run clauses: from ``open_implementation``."""

    def __init__(self, workers: processes.Workers, info: ImplInfo, config: RunConfig, tmp: str) -> None:
        self.workers, self.info, self.config, self._tmp = workers, info, config, tmp
        self._batches = 0

    def run(self, clauses: Sequence[Clause], progress: Progress = _stderr) -> list[Result]:
        """Every clause gets a result; Ctrl-C raises ``Interrupted`` with those reached so far."""
        results: list[Result] = []
        try:
            with interrupts.deferred():
                self._run(clauses, results, progress)
                interrupts.check()  # a Ctrl-C after the last result still ends the run as interrupted
        except KeyboardInterrupt:
            raise Interrupted(_ordered(results, clauses)) from None
        return _ordered(results, clauses)

    def _run(self, clauses: Sequence[Clause], results: list[Result], progress: Progress) -> None:
        label, device = self.info.name, self.config.device
        by_id = {c.id: c for c in clauses}
        todo, total = [c.id for c in clauses], len(clauses)

        def record(res: Result, note: str = "") -> None:
            results.append(res)
            todo.remove(res.clause)
            progress(f"[{label}] {len(results)}/{total} {res.clause:<34} {res.outcome:<8} "
                     f"({note or f'{res.duration_s:.1f}s'})")

        while todo:
            self._batches += 1
            events = os.path.join(self._tmp, f"events-{self._batches}.jsonl")
            errlog = os.path.join(self._tmp, f"stderr-{self._batches}.log")
            try:
                batch = self.workers.batch(todo, events, errlog)
            except processes.LoadError as exc:
                for cid in list(todo):
                    record(Result(cid, label, "error", f"not run: {exc}", level=by_id[cid].level, device=device),
                           "no worker")
                return
            offset, current, started, timed_out = 0, None, time.monotonic(), False
            try:
                while True:
                    interrupts.check()  # the one place this loop acts on a Ctrl-C
                    evs, offset = processes.read_events(events, offset)
                    for ev in evs:
                        if ev["event"] == "start":
                            current, started = ev["clause"], time.monotonic()
                            interrupts.point("clause")
                        elif ev["event"] == "result":
                            record(Result.from_json(ev))
                            current = None
                            interrupts.point("between")
                    if batch.poll() is not None:
                        evs, offset = processes.read_events(events, offset)
                        if evs:
                            continue  # drain the last events first
                        break
                    if current is not None:
                        if time.monotonic() - started > HUNG_S:
                            interrupts.point("hung")
                        limit = self.config.limit(by_id[current])
                        if time.monotonic() - started > limit:
                            batch.kill()
                            record(Result(current, label, "error", f"timed out after {limit:g} s (--timeout "
                                          "changes it); the worker was killed", limit, level=by_id[current].level,
                                          device=device), f"timed out after {limit:g} s; --timeout changes it")
                            current, timed_out = None, True
                            break
                    time.sleep(0.02)
            finally:
                batch.kill()  # no-op once it ended; on Ctrl-C it must not outlive the run
            code = batch.poll()
            if timed_out:
                continue
            if current is not None:  # it died inside a clause: that clause is the error, the rest go on
                lines = processes.tail(errlog)
                msg = f"worker {processes.describe_exit(code)} while running this clause"
                if lines:
                    msg += ": " + " | ".join(lines)
                record(Result(current, label, "error", msg, time.monotonic() - started,
                              level=by_id[current].level, device=device), processes.describe_exit(code))
            elif todo and code not in (0, None):  # it died between clauses: that cannot be pinned on one
                lines = processes.tail(errlog, 1) or ["no output"]
                cid = todo[0]
                record(Result(cid, label, "error", f"worker {processes.describe_exit(code)} before this clause "
                              f"started: {lines[0]}", level=by_id[cid].level, device=device),
                       processes.describe_exit(code))
            elif todo:  # it ended cleanly without running them: a bug here, not in the implementation
                for cid in list(todo):
                    record(Result(cid, label, "error", "the worker ended without running this clause",
                                  level=by_id[cid].level, device=device), "not run")

    def close(self) -> None:
        self.workers.close()


def _ordered(results: list[Result], clauses: Sequence[Clause]) -> list[Result]:
    order = {c.id: i for i, c in enumerate(clauses)}
    return sorted(results, key=lambda r: order[r.clause])


@contextmanager
def open_implementation(
    impl: str, config: RunConfig | None = None, *, python: str = sys.executable, load_timeout_s: float = 300.0,
    fork: bool | None = None,
) -> Iterator[Implementation]:
    """Load ``impl`` (built-in, entry point or ``package.module:attr``) in ``python``; UsageError if it cannot be.

    ``fork``: None uses a fork server where ``os.fork`` exists, False a fresh interpreter per batch.
    """
    config = config or RunConfig()
    # abspath, not realpath: two venvs' interpreters are symlinks to one base interpreter
    own = os.path.abspath(python) == os.path.abspath(sys.executable)
    # a Ctrl-C while loading or running is acted on where it is safe (conformance.harness.interrupts)
    with interrupts.deferred(), tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        packages = {} if own else interpreter_packages(python)  # a clear UsageError before any worker starts
        try:
            workers = processes.start(config.options(impl), tmp, python, load_timeout_s, fork)
        except processes.LoadError as exc:
            raise UsageError(str(exc)) from None
        info = _info(impl, workers.info)
        if not own:
            info.python, info.packages = python, packages
        try:
            yield Implementation(workers, info, config, tmp)
        finally:
            workers.close()


def describe(impl: str, timeout_s: float = 300.0, *, python: str = sys.executable) -> ImplInfo:
    """Load an implementation in a worker; UsageError with a one-line message if it cannot be loaded."""
    with open_implementation(impl, python=python, load_timeout_s=timeout_s, fork=False) as loaded:
        return loaded.info


def run_implementation(
    impl: str,
    clauses: Sequence[Clause],
    *,
    device: str = "cpu",
    seed: int = 0,
    timeout_scale: float = 1.0,
    timeout: float | None = None,
    examples: int | None = None,
    steps: int | None = None,
    report_dir: str | None = None,
    progress: Progress = _stderr,
    label: str | None = None,
    python: str = sys.executable,
    fork: bool | None = None,
    slow: bool = False,
) -> list[Result]:
    """Run ``clauses`` for one implementation in worker processes; never raises for the implementation's faults.

    ``impl`` is what to load (``--impl``); results carry the implementation's declared name
    unless ``label`` names them otherwise. ``slow``: the slow tier (``Budget.slow``).
    """
    config = RunConfig(device, seed, examples, steps, report_dir, timeout, timeout_scale, slow)
    with interrupts.deferred():
        with open_implementation(impl, config, python=python, fork=fork) as loaded:
            loaded.info.name = label or loaded.info.name
            results = loaded.run(clauses, progress)
        if interrupts.requested():  # a Ctrl-C while the workers were being stopped: every clause ran
            raise Interrupted(results)
    return results


def apply_xfails(results: list[Result], entries: list[xf.Xfail], strict: bool = True,
                 progress: Progress = _stderr) -> None:
    """Outcomes after the xfail entries, by the rule pytest uses too (``conformance.harness.xfails.resolve``);
    entries that matched nothing are warned about."""
    for msg in xf.apply(results, entries, strict=strict):
        progress(f"warning: {msg}")
