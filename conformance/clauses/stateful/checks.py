"""Stateful clauses (area "stateful"): invariants of an adapter layer's lifecycle.

One hypothesis state machine run (``conformance.clauses.stateful.run``) per (implementation, device,
budget) feeds every clause here: it is kept by the budget (``Budget.shared``, owned by whoever runs the
clauses: one worker batch, one implementation's checks, one test), and each clause reports from it:

- ``failed``: its invariant broke; every distinct violation is reported, one per kind of step that broke
  it in each (method, bits) case (the shrunk minimal sequence, the drawn seeds it needs, and the path of a
  runnable reproducer script written to ``ctx.report_dir`` or a temporary directory);
- ``skipped``: none of the ops that reach its invariant can be drawn for the implementation's
  declared capabilities (``FLOORS[clause]["ops"]``, ``conformance.clauses.stateful.ops.OPS[op].needs``);
- ``inconclusive``: the run fell short of the clause's floor (``conformance.clauses.stateful.declare.FLOORS``):
  exploring examples ended early (a step raised or was refused) or its ops reached its invariant too rarely;
- ``xfailed``: (STATE-VALID-NEVER-RAISES) valid steps raised only inside bitsandbytes, in a situation its shipped
  list (``xfails/bitsandbytes.ini``, ``CheckContext.known_upstream``) names for the running bitsandbytes on this
  CPU (``config.UpstreamFailure``: a forward with grad on a base in the CPU packed layout); not listed, they fail;
- ``passed`` otherwise.

Budget: ``ctx.budget.stateful_examples`` / ``stateful_steps`` / ``stateful_shrink_s`` (CI default).
Measurements: examples, steps, exploring examples/steps and steps per example, steps per op, the
ops reaching the clause's invariant and how often each (method, bits) case reached it, the worst ratio of the bounded clauses, the steps run on a base in
bitsandbytes' CPU packed layout and the repacks, and the run's wall time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conformance.clauses.clause import check
from conformance.clauses.stateful import run as sr
from conformance.clauses.stateful.config import Stats
from conformance.clauses.stateful.declare import DRIFT, FLOORS, INVALID, MERGE, OUTPUT, STATE_IDS, UNMERGE, VALID
from conformance.clauses.stateful.ops import OPS, declared

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

_BOUNDED = (OUTPUT, MERGE, UNMERGE, DRIFT)


def machine_run(ctx: CheckContext) -> sr.RunResult:
    """The machine run for this context's implementation, device and report directory, made once per budget
    (``ctx.budget.shared``): every STATE-* clause run under that budget reports from the same run."""
    b, impl = ctx.budget, ctx.impl
    report_dir = getattr(ctx, "report_dir", None)
    return b.shared.get(impl, ("stateful", ctx.device, report_dir, ctx.target), lambda: sr.run(
        impl, ctx.device, examples=b.stateful_examples, steps=b.stateful_steps, shrink_s=b.stateful_shrink_s,
        out=report_dir, target=ctx.target))


def unreachable(clause: str, capabilities: frozenset[str]) -> str | None:
    """Why none of the ops reaching ``clause``'s invariant can be drawn, or None when one can."""
    ops: Any = FLOORS[clause]["ops"]
    if "*" in ops:
        return None
    missing = {op: [c for c in OPS[op].needs if c not in capabilities] for op in ops}
    if any(declared(OPS[op], capabilities) for op in ops):
        return None
    return "; ".join(f"{op} needs capability {', '.join(caps)}" for op, caps in missing.items())


def _thin(clause: str, s: Stats, steps_per_example: int, where: str = "", steps: bool = True) -> list[str]:
    """Why the counters ``s`` fall short of ``clause``'s floor (``FLOORS``); ``where`` names a case; ``steps``: judge
    the steps-per-example floor too (else only how often the clause's invariant was reached)."""
    floor = FLOORS[clause]
    need_steps = float(floor["steps_per_example"]) * steps_per_example  # type: ignore[arg-type]
    mean = s.explore_steps / s.explore_examples if s.explore_examples else 0.0
    reasons = []
    if steps and mean < need_steps:
        reasons.append(f"{where}exploring examples ran {mean:.1f} steps on average (floor {need_steps:.1f} of "
                       f"the {steps_per_example} budgeted): the implementation ended "
                       f"{s.ended_early} examples early (a step raised or was refused)"
                       + "".join(f"; bitsandbytes' listed failure {k} ended {n} examples"
                                 for k, (n, _) in sorted(s.upstream.items())))
    reached = sum(s.reached.get(clause, {}).values())
    if reached < int(floor["reached"]):  # type: ignore[call-overload]
        ops: Any = floor["ops"]
        what = "steps" if "*" in ops else "/".join(ops) + " steps"
        reasons.append(f"{where}{what} reached the clause's invariant {reached} times (floor {floor['reached']})")
    return reasons


def shortfall(clause: str, run: sr.RunResult) -> str | None:
    """Why ``run`` is too thin to judge ``clause`` (its floor in ``FLOORS``), or None: over the whole run, and for
    each (method, bits) case alone (``RunResult.case_stats``) how often its steps reached the clause's invariant:
    one shared run feeds every family, and a family whose examples all ended at once (a method whose layers cannot
    be built) must not pass on the checks of the others (a verdict never says more than what ran). The
    steps-per-example floor is judged over the run: a case of PEFT 0.21.2's LoRA ran 4.5 steps per example under
    the CI budget (its listed failures end examples), under the 5.0 the run as a whole keeps."""
    reasons = _thin(clause, run.stats, run.steps_per_example)
    for label, s in sorted(run.case_stats.items()):
        reasons += _thin(clause, s, run.steps_per_example, f"case {label}: ", steps=False)
    return "; ".join(reasons) or None


def upstream_cases(ctx: CheckContext, s: Stats) -> None:
    """One case per situation of a listed bitsandbytes failure the run met (``Stats.upstream``): ``xfailed`` when
    the list covers it here and its error text matches, failed otherwise (``CheckContext.case``)."""
    for situation, (n, message) in sorted(s.upstream.items()):
        ctx.measure(f"steps_meeting_{situation}", n)
        with ctx.case(f"stateful {situation}", known=ctx.known_upstream(situation)):
            ctx.fail(f"{n} valid step(s) raised inside bitsandbytes ({situation}); the first: {message}")


def report(ctx: CheckContext) -> None:
    """Measurements and the outcome of ``ctx.clause`` from the shared run."""
    cid = ctx.clause.id
    why = unreachable(cid, ctx.declaration.capabilities)
    if why:
        ctx.skip(f"{ctx.impl.name} declares no capability for the ops this clause checks ({why})")
    run = machine_run(ctx)
    s = run.stats
    ctx.measure("examples", s.examples)
    ctx.measure("steps", s.steps)
    ctx.measure("exploring_examples", s.explore_examples)
    ctx.measure("exploring_steps", s.explore_steps)
    ctx.measure("steps_per_example", run.mean_steps)
    ctx.measure("examples_ended_early", s.ended_early)
    ctx.measure("steps_per_op", dict(sorted(s.ops.items())))
    ctx.measure("reached_by_op", dict(sorted(s.reached.get(cid, {}).items())))
    ctx.measure("reached_by_case", {label: sum(cs.reached.get(cid, {}).values())
                                    for label, cs in sorted(run.case_stats.items())})
    ctx.measure("machine_wall_s", run.wall_s)
    ctx.measure("steps_on_packed_layout", s.steps_on_packed_layout)
    ctx.measure("repacks", s.repacks)
    ctx.measure("budget", {"examples": run.examples_per_case, "steps": run.steps_per_example,
                           "shrink_s": ctx.budget.stateful_shrink_s})
    if cid in _BOUNDED and cid in s.worst:
        ctx.measure("worst_ratio", s.worst[cid])
    if s.stopped:
        ctx.note(f"shrinking was cut by the time budget (Budget.stateful_shrink_s = {ctx.budget.stateful_shrink_s:g}); "
                 "the sequence reported is the shortest found so far, with the steps deleted that still show it")
    if cid == INVALID:
        for n in sorted(s.notes):
            if n.startswith("invalid "):
                ctx.note(n)
    if run.errors and cid == VALID:
        ctx.fail("the state machine itself failed: " + " | ".join(run.errors))
    if cid == VALID:
        upstream_cases(ctx, s)
    fails = run.failures.get(cid, [])
    if fails:
        ctx.measure("reproducer", fails[0].reproducer)
        ctx.measure("violations", [f"{f.config.get('method')}/{f.config.get('bits')}bit {f.kind}" for f in fails])
        if len(fails) > 1:
            ctx.measure("reproducers", [f.reproducer for f in fails])
        parts = []
        for f in fails:
            depends = "".join(f"\n{d}" for d in f.depends)
            parts.append(f"by a {f.kind} step: {f.message}\nminimal sequence ({run.implementation} {run.version}):\n"
                         f"{f.minimal_sequence()}{depends}\nreproducer: {f.reproducer}")
        ctx.fail(f"{len(fails)} distinct violation(s) of {cid} (kind of step x case):\n" + "\n\n".join(parts))
    thin = shortfall(cid, run)
    if thin:
        ctx.inconclusive(thin)


for _cid in STATE_IDS:
    check(_cid)(report)

# STATE-COMPILE (slow tier) has its own machine and check
from conformance.clauses.stateful import compiling as _compiling  # noqa: E402, F401
