"""Invalid steps (clause STATE-INVALID-STEP-SAFE): each must raise or warn, and change nothing.

``KINDS`` maps a kind to (capability it needs, whether the state allows it, the call it makes).
An invalid step is checked with the same invariants as a valid one (``Driver.check_invariants``);
a broken one is reported as STATE-INVALID-STEP-SAFE, naming the invariant's own clause.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from conformance.clauses.cases import POISONS
from conformance.clauses.observe import implementation_warnings
from conformance.clauses.stateful.declare import INVALID
from conformance.core.vocabulary import capability

from .config import Violation, step_kind, violation_type

if TYPE_CHECKING:
    from .driver import Driver

#: kind -> (capability needed or None, applies(d), (description, call) for d)
KINDS: dict[str, tuple[str | None, Callable[[Driver], bool], Callable[[Driver, int], tuple[str, Callable[[], Any]]]]] = {
    "set_unknown": (None, lambda d: True,
                    lambda d, s: ("set_adapter(['nope'])", lambda: d.layer.set_adapter(["nope"]))),
    "merge_unknown": (None, lambda d: True,
                      lambda d, s: ("merge(adapter_names=['nope'])", lambda: d.layer.merge(adapter_names=["nope"]))),
    "unmerge_unmerged": ("unmerge", lambda d: not d.merged,
                         lambda d, s: ("unmerge() with nothing merged", d.layer.unmerge)),
    "merge_merged": (None, lambda d: d.merged,
                     lambda d, s: (f"merge(adapter_names={d.model.merged[:1]}) of a merged adapter",
                                   lambda: d.layer.merge(adapter_names=d.model.merged[:1]))),
    "delete_unknown": ("delete_adapter", lambda d: True,
                       lambda d, s: ("delete_adapter('nope')", lambda: d.layer.delete_adapter("nope"))),
    "delete_merged": ("delete_adapter", lambda d: d.merged,
                      lambda d, s: (f"delete_adapter({d.model.merged[:1]}) of a merged adapter",
                                    lambda: d.layer.delete_adapter(d.model.merged[0]))),
    "add_existing": ("multi_adapter", lambda d: True,
                     lambda d, s: (f"add_adapter({d.names[0]!r}) of an existing adapter",
                                   lambda: d.layer.add_adapter(d.names[0], **d.model.adapters[d.names[0]].params))),
    "mixed_when_merged": ("mixed_batch", lambda d: d.merged and d.mixed_ok(),
                          lambda d, s: ("forward(x, adapter_names=...) while merged",
                                        lambda: d.layer(d.input((2,), "float32", s), adapter_names=[d.names[0],
                                                                                                  "__base__"]))),
    "mixed_unknown": ("mixed_batch", lambda d: not d.merged and d.mixed_ok(),
                      lambda d, s: ("forward(x, adapter_names=['nope', ...])",
                                    lambda: d.layer(d.input((2,), "float32", s), adapter_names=["nope", d.names[0]]))),
    "merge_poisoned": ("safe_merge", lambda d: bool(poisonable(d)),
                       lambda d, s: poisoned_safe_merge(d, s)),
    "wrong_in_features": (None, lambda d: True,
                          lambda d, s: ("forward of an input with in_features + 1",
                                        lambda: d.layer(d.input((2,), "float32", s, d.config.in_features + 1)))),
}
for _kind, (_needs, *_) in KINDS.items():  # a misspelled capability fails at import
    if _needs is not None:
        capability(_needs)
INVALID_KINDS = tuple(KINDS)
#: kinds that must raise (a warning is not enough): a safe merge of a non-finite adapter refuses
MUST_RAISE = frozenset({"merge_poisoned"})
#: kinds drawn by an op of their own (``ops.OPS["poison_safe_merge"]``), not among the ``invalid`` op's kinds
OWN_OP = frozenset({"merge_poisoned"})


def poisonable(d: Driver) -> list[str]:
    return [n for n in d.names if n not in d.model.merged]


def poisoned_safe_merge(d: Driver, seed: int) -> tuple[str, Callable[[], Any]]:
    """Poison one entry of an unmerged adapter with NaN/+Inf/-Inf (by ``seed``), ``merge(safe_merge=True)`` it,
    and put the entry back whatever happens: the merge must raise and change nothing (SAFE-MERGE-NONFINITE
    mid-sequence, on whatever state the machine reached)."""
    names = poisonable(d)
    name = names[seed % len(names)]
    kind, value = list(POISONS.items())[seed % len(POISONS)]
    key = sorted(d.layer.adapter_parameters(name))[-1]  # lora_B.weight / oft_R.weight
    desc = f"{name}[{key!r}][0] = {kind}; merge(safe_merge=True, adapter_names=[{name!r}])"

    def call() -> None:
        p = d.layer.adapter_parameters(name)[key]
        flat = p.data.view(-1)
        old = flat[0].clone()
        flat[0] = value
        try:
            d.layer.merge(safe_merge=True, adapter_names=[name])
        finally:
            p.data.view(-1)[0] = old
    return desc, call


def applicable_kinds(d: Driver) -> list[str]:
    """The invalid kinds the machine may draw now (capabilities, state, and ``exclude_invalid``)."""
    return [k for k, (cap, ok, _) in KINDS.items()
            if k not in d.exclude_invalid and k not in OWN_OP and (cap is None or d.has(cap)) and ok(d)]


def poison_safe_merge(d: Driver, a: dict[str, Any]) -> None:
    """The ``poison_safe_merge`` op: the ``merge_poisoned`` kind as a step of its own (drawn whenever the
    implementation declares ``safe_merge`` and an adapter is unmerged)."""
    run_invalid(d, {"kind": "merge_poisoned", "seed": a["seed"]})


def run_invalid(d: Driver, a: dict[str, Any]) -> None:
    kind = a["kind"]
    what, fn = KINDS[kind][2](d, a["seed"])
    raised: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                fn()
        except Exception as exc:
            raised = exc
    warned = [t for t in implementation_warnings(caught) if t.strip()]
    d.stats.notes.add(f"invalid {kind}: " + (f"raises {type(raised).__name__}" if raised else
                                             "warns" if warned else "silent"))
    d.stats.reach(INVALID, "invalid")
    where = f"invalid step {what}: "
    recording, d.recording = d.recording, False  # a broken invariant here is reported as INVALID only
    try:
        d.check_invariants(where)
    except Violation as v:
        how = f"raised {type(raised).__name__}" if raised else "warned" if warned else "was silently accepted"
        w = violation_type(INVALID, step_kind(d.trace[-1]))(f"{v.message} (the invalid step {how} but changed the state: {v.clause})",
                                v.trace, v.config)
        if recording:
            d.stats.record(w)
        raise w from None
    finally:
        d.recording = recording
    if raised is None and not warned:
        d.fail(INVALID, f"{where}was silently accepted: no exception and no warning")
    if raised is None and kind in MUST_RAISE:
        d.fail(INVALID, f"{where}did not raise: a safe merge must refuse non-finite weights")
