"""``multi_adapter`` is split by what is checked: several named adapters (``multi_adapter``), several active whose
deltas add up (``additive_adapters``), several merged at once (``multi_merge``). A library that holds one merged
adapter at a time and one active adapter (AdapterHub ``adapters``: "LoRALayer already has a merged LoRA module.
Please reset it first.") gets the lifecycle clauses that apply to it and a skip, naming the capability, for the rest.

The yardstick for that: the reference with its layers made to refuse what such a library refuses
(``OneAtATimeImplementation``); every gated step it refuses would fail the clause if the gate were missing.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.clauses.budget import Budget
from conformance.clauses.clause import registry
from conformance.clauses.interface import AdapterSpec
from conformance.core.vocabulary import Capability
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation


class _OneAtATime:
    """Refuses several active adapters and a second merged one, as a library without the two capabilities does."""

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"one active adapter at a time, got {names}")
        super().set_adapter(names)  # type: ignore[misc]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        todo = list(self.active_adapters) if adapter_names is None else list(adapter_names)  # type: ignore[attr-defined]
        if self.merged or len(todo) != 1:  # type: ignore[attr-defined]
            raise ValueError("the layer already has a merged adapter (or several asked): unmerge first")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)  # type: ignore[misc]


class OneAtATimeImplementation(ReferenceImplementation):
    name = "one-at-a-time"
    capabilities = ReferenceImplementation.capabilities - {Capability.ADDITIVE_ADAPTERS, Capability.MULTI_MERGE}

    def create(self, base_layer: Any, spec: AdapterSpec) -> Any:
        layer = super().create(base_layer, spec)
        cls = type(layer)
        layer.__class__ = type(f"OneAtATime{cls.__name__}", (_OneAtATime, cls), {})
        return layer


IMPL = OneAtATimeImplementation()

#: the clauses that need several named adapters only: they run (a case that needs more is skipped alone)
RUN = ("MERGE-SUBSET", "LIFECYCLE-SUBSET-UNMERGE", "LIFECYCLE-TRAINABLE", "LIFECYCLE-MERGED-DELETE",
       "SAFE-MERGE-OTHER-ADAPTER", "FWD-MIXED-BATCH", "MODEL-SET-ADAPTER")
#: the clauses that need more, and the capability their skip names
SKIP = {"MERGE-MULTI": "additive_adapters"}


@pytest.mark.parametrize("cid", RUN)
def test_clauses_of_several_named_adapters_run_and_pass(cid: str) -> None:
    res = run_clause(registry()[cid], IMPL)
    assert res.outcome == "passed", f"{cid}: {res.outcome}: {res.message}"


def test_the_cases_needing_more_are_skipped_by_name() -> None:
    res = run_clause(registry()["LIFECYCLE-SUBSET-UNMERGE"], IMPL)
    assert res.cases_skipped.get("additive_adapters"), res.cases_skipped
    for cid, cap in SKIP.items():
        res = run_clause(registry()[cid], IMPL)
        assert res.outcome == "skipped" and cap in res.message, f"{cid}: {res.outcome}: {res.message}"


def test_the_state_machine_merges_one_at_a_time() -> None:
    """The stateful clauses draw no second merge and no two active adapters for it: a refusal of either would be a
    STATE-VALID-NEVER-RAISES violation."""
    budget = Budget(stateful_examples=4, stateful_steps=12, stateful_shrink_s=0)
    for cid in ("STATE-VALID-NEVER-RAISES", "STATE-MERGE-MATCHES-MODEL"):
        res = run_clause(registry()[cid], IMPL, budget=budget)
        assert res.outcome == "passed", f"{cid}: {res.outcome}: {res.message}"
