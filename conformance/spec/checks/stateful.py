"""Stateful clauses (area "stateful", issue #8): invariants of an adapter layer's lifecycle.

One hypothesis state machine run (``conformance.spec.stateful.machine.run``) per (implementation,
device) feeds every clause here: it is cached for the process, and each clause reports the
violations of its own invariant (the shrunk minimal sequence, and the path of a runnable
reproducer script written to $CONFORMANCE_REPORT_DIR or a temporary directory). Budget: the
CI default (derandomized, a few examples of a few steps per (method, bits) case), or
$CONFORMANCE_STATEFUL_EXAMPLES / $CONFORMANCE_STATEFUL_STEPS for longer runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conformance.spec.catalog.stateful import STATE_IDS
from conformance.spec.clauses import check
from conformance.spec.stateful import machine as sm

if TYPE_CHECKING:
    from conformance.harness.context import CheckContext

_CACHE: dict[tuple, sm.RunResult] = {}



def machine_run(ctx: CheckContext) -> sm.RunResult:
    """The (cached) machine run for this context's implementation and device."""
    n_ex, n_steps = sm.budget()
    impl = ctx.impl
    key = (type(impl).__module__, type(impl).__qualname__, impl.name, id(impl), ctx.device, n_ex, n_steps)
    if key not in _CACHE:
        _CACHE[key] = sm.run(impl, ctx.device, examples=n_ex, steps=n_steps)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


_RATIO_OF = {sm.OUTPUT: sm.OUTPUT, sm.MERGE: sm.MERGE, sm.UNMERGE: sm.UNMERGE, sm.DRIFT: sm.DRIFT}


def report(ctx: CheckContext) -> None:
    """Measurements and the outcome of ``ctx.clause`` from the shared run."""
    run = machine_run(ctx)
    cid = ctx.clause.id
    ctx.measure("examples", run.stats.examples)
    ctx.measure("steps", run.stats.steps)
    ctx.measure("machine_wall_s", run.wall_s)
    if cid in _RATIO_OF and cid in run.stats.worst:
        ctx.measure("worst_ratio", run.stats.worst[cid])
    if run.stats.stopped:
        ctx.note("shrinking was cut by the time budget ($CONFORMANCE_STATEFUL_SHRINK_S); the sequence reported is "
                 "the shortest found so far")
    if cid == sm.INVALID:
        for n in sorted(run.stats.notes):
            if n.startswith("invalid "):
                ctx.note(n)
    if run.errors and cid == sm.VALID:
        ctx.fail("the state machine itself failed: " + " | ".join(run.errors))
    fails = run.failures.get(cid, [])
    if fails:
        ctx.measure("reproducer", fails[0].reproducer)
        if len(fails) > 1:
            ctx.measure("reproducers", [f.reproducer for f in fails])
        parts = []
        for f in fails:
            parts.append(f"{f.message}\nminimal sequence ({run.implementation} {run.version}):\n"
                         f"{f.minimal_sequence()}\nreproducer: {f.reproducer}")
        ctx.fail(f"{len(fails)} case(s) violate {cid}:\n" + "\n\n".join(parts))


for _cid in STATE_IDS:
    check(_cid)(report)
