"""Running the machine with a budget: one hypothesis run per (method, bits) case, failures to reproducers.

The budget is configuration (:class:`conformance.clauses.budget.Budget`, carried by the check
context; ``python -m conformance.clauses.stateful --examples/--steps``), never an environment variable;
reproducer scripts go to an explicit directory (else a fresh temporary one).

Every distinct violation is reported: one per (clause, step kind) of each (method, bits) case, not
only the first. Hypothesis shrinks one failure at a time and stops generating soon after its first,
so a case runs in passes (:class:`~.config.Stats`):

1. an exploring pass over the whole example budget in which nothing raises: each violation is
   recorded (the shortest sequence per key) and its example goes on with a fresh layer
   (:mod:`.machine`), so the pass costs what a passing run costs and a later violation is still seen;
2. shrink passes with the same seed in which the keys not shrunk yet raise (the others go on with a
   fresh layer as before): hypothesis generates the same examples up to the first of them, goes on a
   little (its own limit after a first bug) and shrinks each key it met, one bug per key; the keys it
   did not meet wait for the next pass. Shrinking stops ``shrink_s`` seconds after a pass's first
   violation, so a failing implementation cannot blow the CI budget; only then does the step-deletion
   pass of :mod:`.shrink` run on the keys of that pass (otherwise it would only repeat hypothesis' own
   shrinker).

A run with ``derandomize=False`` and no seed draws one (``RunResult.seed``), so the shrink passes
replay the exploring pass's examples and the run can be repeated.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import run_state_machine_as_test

from conformance.clauses.budget import CI
from conformance.clauses.interface import Implementation, declared

from .config import Stats, StopRun, Violation, configs_for, machine_cases
from .machine import make_machine
from .ops import render_step
from .shrink import delete_steps, seed_dependence


def impl_target(impl: Implementation, target: str | None = None) -> tuple[str, bool]:
    """(the string a reproducer rebuilds ``impl`` from, whether that string keeps its constructor arguments).

    ``target``: the string ``impl`` was loaded from (``conformance.harness.loader.load``: a built-in name, an entry
    point or ``module:attr``; the check context carries it as ``CheckContext.target``); without one, ``impl`` is
    rebuilt from its class with no arguments (``False``)."""
    if target:
        return str(target), True
    return f"{type(impl).__module__}:{type(impl).__qualname__}", False


@dataclass
class Failure:
    clause: str
    message: str
    config: dict[str, Any]
    trace: list[dict[str, Any]]
    reproducer: str | None = None
    #: the kind of step that broke the invariant (``config.step_kind``: the op, ``invalid:KIND``)
    kind: str = ""
    #: drawn values the finding needs (see shrink.seed_dependence); empty: any seed shows it
    depends: list[str] = field(default_factory=list)

    def minimal_sequence(self) -> str:
        return "\n".join(f"  {i}. {render_step(s)}" for i, s in enumerate(self.trace))


@dataclass
class RunResult:
    implementation: str
    version: str
    device: str
    examples_per_case: int
    steps_per_example: int
    cases: list[str]
    target: str = ""
    #: the hypothesis seed every case ran from (None: derandomized, or random without a seed)
    seed: int | None = None
    wall_s: float = 0.0
    case_wall_s: dict[str, float] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    #: each (method, bits) case's own counters (``stats`` adds them up): the clauses' floors hold per case too, so a
    #: case whose examples all ended at once (a method no step can be run for) cannot pass on the others' steps
    case_stats: dict[str, Stats] = field(default_factory=dict)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: where this run's reproducers went (the ``out`` given, else one temporary directory per run)
    reproducer_dir: str | None = None

    @property
    def mean_steps(self) -> float:
        """Steps per exploring example (those generated before a case's first violation)."""
        s = self.stats
        return s.explore_steps / s.explore_examples if s.explore_examples else 0.0

    def summary(self) -> str:
        s = self.stats
        lines = [f"stateful machine, implementation {self.implementation} ({self.version}) on {self.device}: "
                 f"{s.examples} examples, {s.steps} steps over {', '.join(self.cases)} "
                 f"({self.examples_per_case} examples x <= {self.steps_per_example} steps each) in {self.wall_s:.1f}s"
                 + (f", seed {self.seed}" if self.seed is not None else ""),
                 f"exploring: {s.explore_examples} examples, {s.explore_steps} steps ({self.mean_steps:.1f} per "
                 f"example); {s.ended_early} examples ended by a violation; {s.shrink_passes} shrink passes",
                 "worst observed/bound ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(s.worst.items())),
                 "steps run: " + ", ".join(f"{k} {v}" for k, v in sorted(s.ops.items()))]
        if s.steps_on_packed_layout or s.repacks:
            lines.append(f"bitsandbytes' CPU packed layout: {s.steps_on_packed_layout} steps on a packed base, "
                         f"{s.repacks} repacks")
        for situation, (n, message) in sorted(s.upstream.items()):
            lines.append(f"bitsandbytes {situation} (listed failure, reported by STATE-VALID-NEVER-RAISES): "
                         f"{n} steps, the first: {message}")
        if not self.failures and not self.errors:
            lines.append("no violations")
        for cid, fails in self.failures.items():
            for f in fails:
                lines += [f"VIOLATION {cid} by {f.kind}: {f.message}", "minimal sequence:", f.minimal_sequence(),
                          *[f"  {d}" for d in f.depends], f"reproducer: {f.reproducer}"]
        for e in self.errors:
            lines.append(f"ERROR (machine): {e}")
        return "\n".join(lines)


def _flatten(exc: BaseException) -> list[BaseException]:
    subs = getattr(exc, "exceptions", None)  # BaseExceptionGroup (hypothesis' multiple bugs)
    if isinstance(subs, tuple | list):
        return [e for sub in subs for e in _flatten(sub)]
    return [exc]


def run(impl: Implementation, device: str = "cpu", *, examples: int | None = None, steps: int | None = None,
        shrink_s: float | None = None, cases: Sequence[tuple[str, int]] | None = None, out: str | None = None,
        derandomize: bool = True, exclude_invalid: Sequence[str] = (), target: str | None = None,
        seed: int | None = None) -> RunResult:
    """Run the machine for every (method, bits) case of ``impl``; write reproducers for failures into ``out``.

    ``examples``/``steps``/``shrink_s`` default to the CI budget (``conformance.clauses.budget.CI``);
    ``target`` is the string ``impl`` was loaded from (see :func:`impl_target`). ``seed``: every case
    generates its sequences from this hypothesis seed (``hypothesis.seed``; it overrides ``derandomize``),
    so a run, or one case of it, is reproduced by the same seed and budget."""
    n_ex = max(1, examples if examples is not None else CI.stateful_examples)
    n_steps = max(1, steps if steps is not None else CI.stateful_steps)
    shrink = shrink_s if shrink_s is not None else CI.stateful_shrink_s
    if cases is None:
        cases = machine_cases(declared(impl))
    pairs = list(cases)
    if seed is None and not derandomize:
        seed = random.SystemRandom().randrange(2**32)  # the shrink passes replay the exploring pass's examples
    result = RunResult(impl.name, str(impl.version()), device, n_ex, n_steps, [f"{m}/{b}bit" for m, b in pairs],
                       target=impl_target(impl, target)[0], seed=seed)
    start = time.perf_counter()
    # Tiny tensors: with several intra-op threads on a loaded 2-core machine every op pays OpenMP
    # wake-up/spin costs (~0.1 s per index_add_ measured, vs 10 us on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, bits in pairs:
            t0 = time.perf_counter()
            _run_case(impl, device, method, bits, n_ex, n_steps, shrink, derandomize, out, result, exclude_invalid,
                      target, seed)
            result.case_wall_s[f"{method}/{bits}bit"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    result.wall_s = time.perf_counter() - start
    return result


def _run_case(impl: Implementation, device: str, method: str, bits: int, n_ex: int, n_steps: int, shrink: float,
              derandomize: bool, out: str | None, result: RunResult, exclude_invalid: Sequence[str],
              target: str | None, seed: int | None = None) -> None:
    from .reproducer import write_reproducer

    total = result.stats
    if total.cuda_fault is not None:
        result.errors.append(f"{method}/{bits}bit: not run: the CUDA context broke in an earlier case")
        return
    cs = Stats(shrink_s=shrink)
    machine = make_machine(impl, configs_for(method, bits, device), device, cs, exclude_invalid)
    if seed is not None:
        machine = hypothesis_seed(seed)(machine)
    label = f"{method}/{bits}bit"
    # the exploring pass: nothing raises, every violation is recorded
    _hypothesis_pass(machine, _settings(n_ex, n_steps, derandomize), cs, result, label)
    cs.exploring = False
    # shrink passes until every key is shrunk (a shrink pass may record keys the exploring pass did not see)
    done: set[tuple[str, str]] = set()
    while cs.cuda_fault is None:
        todo = frozenset(k for k in cs.best if k not in done)
        if not todo:
            break
        cs.target, cs.raised, cs.deadline = todo, set(), None
        cs.shrink_passes += 1
        stopped = _hypothesis_pass(machine, _settings(n_ex, n_steps, derandomize), cs, result, label)
        met = cs.raised & todo
        if stopped:
            cs.cut |= met
        if not met:  # none of them came back (the run is not reproducible): left as recorded, steps deleted
            cs.cut |= todo
            met = set(todo)
        done |= met
    cs.target, cs.deadline = None, None
    if cs.cuda_fault is not None:
        total.cuda_fault = cs.cuda_fault
        result.errors.append(f"{label}: the CUDA context broke (sticky error; the run stops here): {cs.cuda_fault}")
    for key, v in cs.best.items():
        if cs.cuda_fault is None:  # replays would fail anywhere once the context is broken
            if key in cs.cut:  # hypothesis' shrinker was cut short: delete what it had no time to
                v = delete_steps(impl, v, device, min(10.0, shrink), exclude_invalid)
            depends = seed_dependence(impl, v, device, min(5.0, shrink), exclude_invalid)
        else:
            depends = []
        f = Failure(v.clause, v.message, v.config, v.trace, kind=v.kind, depends=depends)
        try:
            if result.reproducer_dir is None:
                result.reproducer_dir = report_dir(out)
            f.reproducer = write_reproducer(impl, f, device, result.reproducer_dir, target)
        except Exception as wexc:  # the report must still say what failed
            f.reproducer = f"(could not write a reproducer: {type(wexc).__name__}: {wexc})"
        result.failures.setdefault(v.clause, []).append(f)
    total.add(cs)
    result.case_stats[label] = cs


def _settings(n_ex: int, n_steps: int, derandomize: bool) -> settings:
    return settings(max_examples=n_ex, stateful_step_count=n_steps, derandomize=derandomize, deadline=None,
                    database=None, print_blob=False, report_multiple_bugs=True,
                    suppress_health_check=list(HealthCheck))


def _hypothesis_pass(machine: Any, conf: settings, cs: Stats, result: RunResult, label: str) -> bool:
    """Run one pass of the machine; errors that are not violations go to ``result.errors``. Whether the time
    budget (or a broken CUDA context) stopped it."""
    was, cs.stopped = cs.stopped, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_state_machine_as_test(machine, settings=conf)
    except StopRun:
        pass
    except BaseException as exc:  # noqa: BLE001  (hypothesis raises groups of failures)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        for e in _flatten(exc):
            if isinstance(e, StopRun | Violation) or cs.stopped:
                # after StopRun hypothesis may report the interrupted test case as flaky: an artifact
                continue
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])
            error = f"{label}: {type(e).__name__}: {e} {tb}"
            if error not in result.errors:  # a shrink pass replays what the exploring pass ran
                result.errors.append(error)
    stopped = cs.stopped
    cs.stopped = was or stopped
    return stopped


def report_dir(out: str | None = None) -> str:
    """Where reproducers go: ``out`` (created), else a fresh temporary directory."""
    path = out or tempfile.mkdtemp(prefix="conformance-stateful-")
    os.makedirs(path, exist_ok=True)
    return path
