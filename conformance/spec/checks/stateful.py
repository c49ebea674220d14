"""Stateful clauses (area "stateful", issue #8): invariants of an adapter layer's lifecycle.

One hypothesis state machine run (``conformance.stateful.machine.run``) per (implementation,
device) feeds every clause here: it is cached for the process, and each clause reports the
violations of its own invariant (the shrunk minimal sequence, and the path of a runnable
reproducer script written to $CONFORMANCE_REPORT_DIR or a temporary directory). Budget: the
CI default (derandomized, a few examples of a few steps per (method, bits) case), or
$CONFORMANCE_STATEFUL_EXAMPLES / $CONFORMANCE_STATEFUL_STEPS for longer runs.
"""

from __future__ import annotations

from conformance.stateful import machine as sm

from ..clauses import clause
from ..context import CheckContext

_CACHE: dict[tuple, sm.RunResult] = {}

SOURCE = ("issue #8; hypothesis RuleBasedStateMachine (zarr store state-machine tests); "
          "peft/tuners/tuners_utils.py BaseTunerLayer; seeds 001, 003 (merge = dequantize, apply, requantize)")


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


#: (clause id, text, extra source): one clause per invariant, all reported from the one shared run
STATE_CLAUSES: tuple[tuple[str, str, str], ...] = (
    (sm.OUTPUT,
     "After any valid sequence of steps (train/eval, grad modes, input shapes and dtypes, training steps, merges, "
     "adapter changes, deepcopy, state_dict round trips, dtype and device moves), the layer's output equals the float64 "
     "model of its logical state within the analytic bound of the current base weights.", ""),
    (sm.BASE,
     "The base layer's packed bytes and quantization state are unchanged, and dequantize gives the same "
     "weights, after every step that is not a merge or unmerge.", "; conformance.quant.snapshot"),
    (sm.FLAGS,
     "merged and merged_adapters always match the merges and unmerges the sequence made (including the unmerge "
     "a forward with disabled adapters performs).", ""),
    (sm.MERGE,
     "Each merge()/unmerge() call leaves weights within the requantization bound of dequantize -> apply/remove "
     "the adapters -> requantize of the weights before the call, with the quantization settings kept.",
     "; conformance.quant.bounds.weight_bound"),
    (sm.UNMERGE,
     "Unmerging everything restores the pre-merge weights within the bound accumulated by the merges and "
     "unmerges in between.", ""),
    (sm.DRIFT,
     "Across any number of merge/unmerge cycles the stored weights stay within the sum of the per-requantization "
     "bounds of the original weights (with the merged adapters applied exactly): drift does not compound.", ""),
    (sm.ADAPTERS,
     "Adapters (names, tensors, active set, enabled flag) change only through the steps meant to change them: "
     "optimizer steps change only trained adapters, and deepcopy and state_dict round trips keep every adapter.", ""),
    (sm.VALID,
     "No step of a valid sequence raises, and a device move leaves no tensor of the layer (bitsandbytes state "
     "included) on the old device.", ""),
    (sm.INVALID,
     "An invalid step (unknown adapter, unmerge with nothing merged, merging a merged adapter, deleting a merged "
     "adapter, re-adding an existing name, mixed batch while merged, wrong input width) raises or warns and "
     "changes nothing: base bytes, merged flags, adapters and active set stay as they were.",
     "; peft tuners_utils check_adapters_to_merge / unmerge warnings"),
)

for _id, _text, _extra in STATE_CLAUSES:
    clause(_id, "MUST", _text, source=SOURCE + _extra, area="stateful")(report)
