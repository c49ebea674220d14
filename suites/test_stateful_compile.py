"""STATE-COMPILE (stateful area, slow tier): the state machine with a compiled-forward rule.

The machine is a subclass of the STATE-* one (``conformance.clauses.stateful.compiling``); the STATE-* machine class
is left as it is, so its derandomized runs draw what they drew. The reference's full run is slow (every compiled
forward compiles afresh); the broken twin fails within one small case.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis.stateful import RULE_MARKER, RuleBasedStateMachine

from conformance.clauses.budget import Budget
from conformance.clauses.clause import get
from conformance.clauses.stateful import compiling
from conformance.clauses.stateful import config as sc
from conformance.clauses.stateful.broken import CompilerDisabledForward, _Broken
from conformance.clauses.stateful.declare import COMPILE, COMPILE_FLOOR, STATE_IDS
from conformance.clauses.stateful.machine import make_machine
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation


def _rules(cls: type[RuleBasedStateMachine]) -> set[str]:
    return {name for name in dir(cls) if getattr(getattr(cls, name), RULE_MARKER, None) is not None}


def test_the_compiling_machine_adds_one_rule_to_the_machine() -> None:
    impl, configs = ReferenceImplementation(), sc.configs_for("lora", 4)
    plain = make_machine(impl, configs)
    comp = compiling.make_compiling_machine(impl, configs)
    assert _rules(comp) - _rules(plain) == {"then_compiled_forward"} and _rules(plain) <= _rules(comp)
    # the STATE-* machine built alone never gets the rule (its draws stay as they were)
    assert "then_compiled_forward" not in _rules(make_machine(impl, configs))


def test_the_clause_is_slow_and_outside_the_shared_run() -> None:
    c = get(COMPILE)
    assert c.slow and c.area == "stateful" and c.level == "MUST" and COMPILE not in STATE_IDS


def test_the_budget_is_a_share_of_the_machine_budget() -> None:
    b = Budget()
    examples, steps = compiling.compile_budget(b.stateful_examples, b.stateful_steps)
    assert 1 <= examples < b.stateful_examples and 2 <= steps <= b.stateful_steps
    assert compiling.compile_budget(1, 1) == (1, 2)


def test_a_forward_under_compiler_disable_is_caught() -> None:
    res = compiling.run(CompilerDisabledForward(), examples=2, steps=4, cases=[("lora", 4)])
    assert res.failures and not res.errors, (res.failures, res.errors)
    v = res.failures[0]
    assert v.clause == COMPILE and v.kind == compiling.OP and "ran eagerly" in v.message
    assert res.stats.ops.get(compiling.OP, 0) >= len(res.failures)


class _OffWhenCompiled:
    """forward adds 1 while dynamo traces it: eager outputs are right, compiled ones are not."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        return y + 1 if torch.compiler.is_compiling() else y


class OffWhenCompiled(_Broken):
    mixin = _OffWhenCompiled


def test_a_compiled_output_off_the_model_is_caught() -> None:
    res = compiling.run(OffWhenCompiled(), examples=2, steps=4, cases=[("lora", 4)])
    assert res.failures and not res.errors, (res.failures, res.errors)
    v = res.failures[0]
    assert v.clause == COMPILE and "compiled output differs from the float64 model" in v.message, v.message


def test_the_clause_fails_on_the_twin() -> None:
    res = run_clause(get(COMPILE), CompilerDisabledForward(), budget=Budget(stateful_examples=16, stateful_steps=8))
    assert res.outcome == "failed" and "ran eagerly" in res.message, res.message


@pytest.mark.slow
def test_reference_passes() -> None:
    """The reference under the CI budget's share (about a minute on a CPU: reported, never asserted)."""
    res = run_clause(get(COMPILE), ReferenceImplementation(), budget=Budget())
    assert res.outcome == "passed", res.message
    m = res.measurements
    assert m["compiled_forwards_checked"] >= COMPILE_FLOOR and 0 < m["worst_ratio"] <= 1, m
