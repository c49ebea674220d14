"""Clauses of area ``stateful``: invariants of an adapter layer's lifecycle (checks: ``conformance.clauses.stateful.checks``,
engine: ``conformance.clauses.stateful``)."""

from conformance.clauses.clause import declare

OUTPUT = "STATE-OUTPUT-MATCHES-MODEL"
BASE = "STATE-BASE-UNCHANGED-WITHOUT-MERGE"
FLAGS = "STATE-MERGED-FLAGS"
MERGE = "STATE-MERGE-MATCHES-MODEL"
UNMERGE = "STATE-UNMERGE-RESTORES"
DRIFT = "STATE-DRIFT-BOUNDED"
ADAPTERS = "STATE-ADAPTERS-PRESERVED"
VALID = "STATE-VALID-NEVER-RAISES"
INVALID = "STATE-INVALID-STEP-SAFE"

SOURCE = ("hypothesis RuleBasedStateMachine (hypothesis.readthedocs.io, stateful testing); peft v0.21.2 "
          "src/peft/tuners/tuners_utils.py BaseTunerLayer (merge/unmerge/set_adapter/delete_adapter bookkeeping); "
          "peft v0.21.2 src/peft/tuners/lora/bnb.py merge/unmerge (dequantize, apply, requantize); "
          "OFT arXiv:2306.07280; DoRA arXiv:2402.09353, peft v0.21.2 src/peft/tuners/lora/variants.py DoraLinearVariant "
          "(merge_safe/unmerge: the norm on the unmerged weight, cached for the unmerge)")

#: (clause id, text, extra source): one clause per invariant, all reported from the one shared run
STATE_CLAUSES: tuple[tuple[str, str, str], ...] = (
    (OUTPUT,
     "After any valid sequence of steps (train/eval, grad modes, input shapes and dtypes, training steps, merges, "
     "adapter changes, deepcopy, state_dict round trips, dtype and device moves), the layer's output equals the float64 "
     "model of its logical state within the analytic bound of the current base weights. DoRA: several active adapters "
     "compose in sequence as PEFT composes them (each one's base term is the output so far minus the bias), and each "
     "adapter's magnitude is moved off its initial value when it is added, so the factor m/||W + sBA|| is not 1 and "
     "LoRA's output does not match.", ""),
    (BASE,
     "The base layer's packed bytes and quantization state are unchanged, and dequantize gives the same "
     "weights, after every step that is not a merge or unmerge.", "; conformance.quant.snapshot"),
    (FLAGS,
     "merged and merged_adapters always match the merges and unmerges the sequence made (including the unmerge "
     "a forward with disabled adapters performs).", ""),
    (MERGE,
     "Each merge()/unmerge() call leaves weights within the requantization bound of dequantize -> apply/remove "
     "the adapters -> requantize of the weights before the call, with the quantization settings kept. DoRA's merge is "
     "not additive: it writes f (W + sBA) with f = m/||W + sBA|| taken on the unmerged weight, and its unmerge divides "
     "by that very f (PEFT's cached norm) before taking sBA off; the machine merges one DoRA adapter at a time into an "
     "unmerged layer (stacked DoRA merges, which PEFT performs by unmerging and merging again, are not drawn).",
     "; conformance.quant.bounds.weight_bound"),
    (UNMERGE,
     "Unmerging everything restores the pre-merge weights within the bound accumulated by the merges and "
     "unmerges in between.", ""),
    (DRIFT,
     "Across any number of merge/unmerge cycles the stored weights stay within the sum of the per-requantization "
     "bounds of the original weights (with the merged adapters applied exactly; a DoRA factor taken on those exact "
     "weights): drift does not compound.", ""),
    (ADAPTERS,
     "Adapters (names, tensors, active set, enabled flag) change only through the steps meant to change them: "
     "optimizer steps change only trained adapters, and deepcopy and state_dict round trips keep every adapter.", ""),
    (VALID,
     "No step of a valid sequence raises, and a device move leaves no tensor of the layer (bitsandbytes state "
     "included) on the old device.", ""),
    (INVALID,
     "An invalid step (unknown adapter, unmerge with nothing merged, merging a merged adapter, deleting a merged "
     "adapter, re-adding an existing name, mixed batch while merged, wrong input width) raises or warns and "
     "changes nothing: base bytes, merged flags, adapters and active set stay as they were; a safe merge of an "
     "adapter poisoned with NaN/Inf mid-sequence (capability safe_merge) raises.",
     "; peft tuners_utils check_adapters_to_merge / unmerge warnings"),
)

for _id, _text, _extra in STATE_CLAUSES:
    declare(_id, "MUST", _text, source=SOURCE + _extra, area="stateful")

STATE_IDS: tuple[str, ...] = tuple(c[0] for c in STATE_CLAUSES)

#: What a stateful clause needs from one run before a pass means anything. A clause whose
#: run falls short is ``inconclusive``, not ``passed``:
#:
#: - ``steps_per_example``: exploring examples (those hypothesis generated before the case's first
#:   violation, shrinking excluded) ran at least this fraction of the budgeted steps per example on
#:   average; an example ends early only when a step raised or was refused;
#: - ``ops`` / ``reached``: the steps whose outcome the clause's invariant checks ("*": every step)
#:   reached that invariant at least ``reached`` times, over the run and in each (method, bits) case alone (one run
#:   feeds every family: a family whose examples all ended at once must not pass on the others' checks).
#:
#: An op the implementation cannot be given (a capability it does not declare) is never drawn; a clause
#: none of whose ``ops`` can be drawn is ``skipped`` with the reason.
STEPS_PER_EXAMPLE = 1 / 3
FLOORS: dict[str, dict[str, object]] = {
    OUTPUT: {"ops": ("forward", "mixed_forward", "train_step"), "reached": 10},
    BASE: {"ops": ("*",), "reached": 10},
    FLAGS: {"ops": ("*",), "reached": 10},
    MERGE: {"ops": ("merge", "unmerge"), "reached": 3},
    UNMERGE: {"ops": ("unmerge",), "reached": 1},
    DRIFT: {"ops": ("merge", "unmerge"), "reached": 3},
    ADAPTERS: {"ops": ("*",), "reached": 10},
    VALID: {"ops": ("*",), "reached": 10},
    INVALID: {"ops": ("invalid",), "reached": 3},
}
for _id in STATE_IDS:
    FLOORS[_id].setdefault("steps_per_example", STEPS_PER_EXAMPLE)

#: the slow-tier clause run by its own machine (``conformance.clauses.stateful.compiling``): the machine above with
#: one more rule, a compiled forward. Not in ``STATE_IDS``: the shared run does not feed it.
COMPILE = "STATE-COMPILE"
declare(
    COMPILE, "MUST",
    "In a state machine that takes the steps of the STATE-* machine and, between them, compiled forwards (a fresh "
    "torch._dynamo.reset(), torch.compile(layer, backend=B) with B aot_eager on the CPU and inductor on CUDA, one "
    "call under torch.no_grad() in the layer's current mode), each compiled forward runs at least one compiled "
    "graph, gives the input's leading dims, out_features and dtype, stays within the analytic bound of the float64 "
    "model of the layer's logical state (as STATE-OUTPUT-MATCHES-MODEL), and keeps what every step keeps (merged "
    "flags, base layer, adapters).",
    source=SOURCE + "; torch 2.13 torch/_dynamo/config.py recompile_limit and fail_on_recompile_limit_hit (a frame "
    "past the limit, or under torch.compiler.disable, runs eagerly); torch 2.13 torch/_dynamo/eval_frame.py "
    "OptimizedModule",
    area="stateful",
    slow=True,
    # every compiled forward compiles afresh: about a second each with aot_eager on a CPU (40 of them took 46-77 s
    # here under the CI budget's share), more with inductor on CUDA
    timeout_s=900.0,
)
#: what a STATE-COMPILE run needs before a pass means anything: compiled forwards that reached its check
COMPILE_FLOOR = 4
