"""STATE-COMPILE (slow tier): the state machine with one more rule, a compiled forward.

``CompilingAdapterLayerMachine`` subclasses the class ``machine.make_machine`` builds and adds the rule
``then_compiled_forward``; the class ``AdapterLayerMachine`` itself is left as it is (its source text is part of a
derandomized run's hypothesis seed, see ``machine.asdict``), so the STATE-* runs draw the same steps as before.

Each compiled forward starts from ``torch._dynamo.reset()`` and compiles the layer as it is now with the backend of
``conformance.clauses.compile.cases.backend_for`` wrapped in ``compile.counting.CountingBackend``: a call that ran no
compiled graph fails (dynamo runs a frame eagerly under ``torch.compiler.disable`` or past its recompile limit).
Its output is checked against the float64 model within the bound the machine uses for eager forwards
(``Driver.check_output``'s), its other effects as any step's (``Driver.check_invariants``).

The run is one exploring pass per (method, bits) case (no shrink passes: a violation is reported with the
shortest sequence that showed it). The budget is a share of the STATE-* one (``compile_budget``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule
from torch._dynamo.utils import counters

from conformance.clauses.clause import check
from conformance.clauses.compile.cases import backend_for
from conformance.clauses.compile.counting import CountingBackend
from conformance.clauses.interface import Implementation, declared
from conformance.quant import layers as qlayers

from .config import VIOLATIONS, Stats, Violation, configs_for, machine_cases
from .declare import COMPILE, COMPILE_FLOOR
from .driver import Driver
from .machine import make_machine
from .ops import INPUT_SHAPES, SEEDS, _in_dtypes, render_step

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

#: the op name of the rule's steps in traces and ``Stats.ops``
OP = "compiled_forward"
#: the share of the STATE-* budget (``Budget.stateful_examples`` / ``stateful_steps``) one case of this run takes:
#: every compiled forward compiles afresh (a second or so on a CPU)
EXAMPLES_SHARE, STEPS_SHARE = 1 / 8, 1 / 2

# Driver.fail(COMPILE, ...) raises the violation type of its clause (``config.violation_type``)
VIOLATIONS.setdefault(COMPILE, type("Violation_" + COMPILE.replace("-", "_"), (Violation,), {"clause": COMPILE}))


def compile_budget(examples: int, steps: int) -> tuple[int, int]:
    """(examples, steps) of one (method, bits) case of the compiling machine for a STATE-* budget."""
    return max(1, math.ceil(examples * EXAMPLES_SHARE)), max(2, math.ceil(steps * STEPS_SHARE))


def compiled_forward(d: Driver, a: dict[str, Any]) -> None:
    """One compiled call of the layer as it is now, checked like an eager forward and for having run compiled."""
    x = d.input(a["lead"], a["dtype"], a["seed"])
    unmerges = d.pending_unmerge_on_forward()
    bias_before = d.bias_dtype()
    torch._dynamo.reset()
    counters.clear()
    counter = CountingBackend(backend_for(d.device))
    compiled = torch.compile(d.layer, backend=counter)

    def go() -> torch.Tensor:
        with torch.no_grad():
            return compiled(x)

    y = d.call("compiled forward (torch.compile, no_grad)", go)
    if counter.runs == 0:
        d.fail(COMPILE, f"the compiled layer ran eagerly: no compiled graph ran ({counter.graphs} captured; dynamo "
                        "runs a frame eagerly under torch.compiler.disable, when it captures nothing, or past "
                        "torch._dynamo.config.recompile_limit)")
    if unmerges:
        d.forward_unmerge(x.dtype, bias_before)
    d.bnb8_bias_cast(x.dtype)
    d.check_invariants()
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (*x.shape[:-1], d.config.out_features) \
            or y.dtype != x.dtype:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        d.fail(COMPILE, f"compiled output {got}, expected {(*x.shape[:-1], d.config.out_features)} {x.dtype}")
    base = d.layer.base_layer
    # as Driver.check_output: a cpu_packed base the forward left in the standard layout ran the standard kernel
    training = True if (d.config.base.cpu_packed and not qlayers.is_cpu_packed(base)
                        and qlayers.repacks_on_eval(base)) else None
    exp = d.model.expected(base, x, None, training=training)
    d.bounded(COMPILE, exp.ratio(y), lambda: (
        f"compiled output differs from the float64 model beyond the analytic bound: {exp.describe(y)}; state: "
        f"active={d.model.active}, merged={d.model.merged}, disabled={d.model.disabled}, "
        f"training={d.model.training}, requantizations={d.model.requantizations}"))


def make_compiling_machine(impl: Implementation, configs: Sequence[Any], device: str = "cpu",
                           stats: Stats | None = None) -> type[RuleBasedStateMachine]:
    """``machine.make_machine``'s class with the rule ``then_compiled_forward`` added (a subclass)."""
    stats = stats if stats is not None else Stats()
    base = make_machine(impl, configs, device, stats)

    class CompilingAdapterLayerMachine(base):  # type: ignore[misc, valid-type]
        # hypothesis orders rules by name and its generation favours the first: named to sort after ``step``, so the
        # lifecycle steps stay the common case and compiled forwards come between them
        @rule(data=st.data())
        def then_compiled_forward(self, data: st.DataObject) -> None:
            if self.d is None:
                return
            d = self.d
            args = {"lead": list(data.draw(st.sampled_from(INPUT_SHAPES), label="lead")),
                    "dtype": data.draw(st.sampled_from(_in_dtypes(d)), label="dtype"),
                    "seed": data.draw(SEEDS, label="seed")}

            def step(d: Driver) -> None:
                d.record({"op": OP, **args})
                compiled_forward(d, args)

            self._guarded(step)

    CompilingAdapterLayerMachine.__name__ = CompilingAdapterLayerMachine.__qualname__ = (
        f"CompilingAdapterLayerMachine_{impl.name}")
    return CompilingAdapterLayerMachine


@dataclass
class CompileRun:
    """What one STATE-COMPILE run saw: its counters, the violations a compiled forward caused (the clause's), the
    other violations (the STATE-* clauses report those from their own run), and errors of the machine."""

    examples: int
    steps: int
    stats: Stats = field(default_factory=Stats)
    failures: list[Violation] = field(default_factory=list)
    others: list[Violation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    #: per (method, bits) case, how many compiled forwards reached the check (each case must reach it: one run
    #: feeds every family, and a method whose examples all ended early must not pass on the others' forwards)
    case_reached: dict[str, int] = field(default_factory=dict)


def run(impl: Implementation, device: str = "cpu", *, examples: int, steps: int,
        cases: Sequence[tuple[str, int]] | None = None) -> CompileRun:
    """One exploring pass of the compiling machine per (method, bits) case (derandomized)."""
    from . import run as sr

    if cases is None:
        cases = machine_cases(declared(impl))
    out = CompileRun(examples, steps)
    holder = sr.RunResult(impl.name, str(impl.version()), device, examples, steps, [f"{m}/{b}bit" for m, b in cases])
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors (see run.run)
    try:
        for method, bits in cases:
            cs = Stats()
            machine = make_compiling_machine(impl, configs_for(method, bits, device), device, cs)
            sr._hypothesis_pass(machine, sr._settings(examples, steps, True), cs, holder, f"{method}/{bits}bit")
            for v in cs.best.values():
                (out.failures if v.clause == COMPILE or v.kind == OP else out.others).append(v)
            out.stats.add(cs)
            out.case_reached[f"{method}/{bits}bit"] = sum(cs.reached.get(COMPILE, {}).values())
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    out.errors = list(holder.errors)
    out.wall_s = time.perf_counter() - start
    return out


@check(COMPILE)
def check_stateful_compile(ctx: CheckContext) -> None:
    b = ctx.budget
    examples, steps = compile_budget(b.stateful_examples, b.stateful_steps)
    res = ctx.budget.shared.get(ctx.impl, ("stateful-compile", ctx.device, ctx.target),
                                lambda: run(ctx.impl, ctx.device, examples=examples, steps=steps))
    s = res.stats
    reached = sum(s.reached.get(COMPILE, {}).values())
    ctx.measure("examples", s.examples)
    ctx.measure("steps", s.steps)
    ctx.measure("compiled_forwards", s.ops.get(OP, 0))
    ctx.measure("compiled_forwards_checked", reached)
    ctx.measure("steps_per_op", dict(sorted(s.ops.items())))
    ctx.measure("machine_wall_s", res.wall_s)
    ctx.measure("budget", {"examples": res.examples, "steps": res.steps})
    if COMPILE in s.worst:
        ctx.measure("worst_ratio", s.worst[COMPILE])
    for v in res.others:
        ctx.note(f"a {v.kind} step broke {v.clause} (the STATE-* clauses report it from their own run): "
                 f"{v.message[:300]}")
    if res.errors:
        ctx.fail("the compiling state machine itself failed: " + " | ".join(res.errors))
    if res.failures:
        parts = [f"{v.clause} by a {v.kind} step: {v.message}\nsequence:\n"
                 + "\n".join(f"  {i}. {render_step(st_)}" for i, st_ in enumerate(v.trace)) for v in res.failures]
        ctx.fail(f"{len(res.failures)} violation(s) by compiled forwards:\n" + "\n\n".join(parts))
    ctx.measure("compiled_forwards_checked_by_case", dict(sorted(res.case_reached.items())))
    unreached = sorted(k for k, n in res.case_reached.items() if n == 0)
    if reached < COMPILE_FLOOR or unreached:
        ctx.inconclusive(f"compiled forwards reached the check {reached} times (floor {COMPILE_FLOOR}; "
                         f"{s.ended_early} examples ended early)"
                         + (f"; none in case {', '.join(unreached)}" if unreached else ""))
