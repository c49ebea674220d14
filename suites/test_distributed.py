"""DIST-DDP-GRADS-AGREE on gloo with 2 spawned ranks: the reference passes, broken variants fail.

The broken implementations live at module level so they pickle into the spawned ranks (the ranks
import this module by name: pytest put ``suites/`` on ``sys.path`` and spawn passes it on). Each
variant covers one family (LoRA on 4-bit) to keep the module to three process groups.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.spec.checks import distributed as ddp_checks
from conformance.spec.clauses import registry

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available in this torch build"),
]

CLAUSE = "DIST-DDP-GRADS-AGREE"
LORA_4BIT = frozenset({"lora", "4bit", "distributed"})


class PerRankState(ReferenceImplementation):
    """Adapter state outside parameters and buffers that differs per rank (seeded by the rank): DDP
    cannot synchronise it, so the averaged gradient is not the single-process one."""

    name = "per-rank-state"
    capabilities = LORA_4BIT

    def create(self, base_layer, spec):
        layer = super().create(base_layer, spec)
        rank = dist.get_rank() if dist.is_initialized() else 0
        offset = torch.randn(base_layer.out_features, generator=torch.Generator().manual_seed(rank)) * 0.1
        layer.register_forward_hook(lambda _m, _args, out: out + offset.to(out))
        return layer


class HiddenFromDDP(ReferenceImplementation):
    """lora_B held outside the module tree: still trained through adapter_parameters, but DDP never
    all-reduces its gradient, so the ranks drift apart."""

    name = "hidden-from-ddp"
    capabilities = LORA_4BIT

    def create(self, base_layer, spec):
        layer = super().create(base_layer, spec)
        holder = layer._modules.pop("lora_B")
        object.__setattr__(layer, "lora_B", holder)
        return layer


@pytest.fixture(scope="module")
def clause():
    return registry()[CLAUSE]


@pytest.fixture(scope="module")
def reference_result(clause):
    return run_clause(clause, ReferenceImplementation())


def test_reference_passes_every_family(reference_result) -> None:
    res = reference_result
    assert res.outcome == "passed", res.message
    assert res.measurements["families"] == {f: "passed" for f in ("lora/4bit", "lora/8bit", "oft/4bit", "oft/8bit")}
    # the single-process comparison is informative: rounding differences exist and stay under the bound
    assert 0 < res.measurements["grad_ratio"] <= 1


def test_state_differing_per_rank_fails(clause) -> None:
    res = run_clause(clause, PerRankState())
    assert res.outcome == "failed", (res.outcome, res.message)
    assert "single process on the whole batch" in res.message


def test_parameters_hidden_from_ddp_fail(clause) -> None:
    res = run_clause(clause, HiddenFromDDP())
    assert res.outcome == "failed", (res.outcome, res.message)
    assert "differ between rank 0 and rank 1" in res.message and "lora_B.weight" in res.message


def test_without_the_capability_it_is_skipped(clause) -> None:
    impl = ReferenceImplementation()
    impl.capabilities = impl.capabilities - {"distributed"}
    res = run_clause(clause, impl)
    assert res.outcome == "skipped" and "distributed" in res.message


def test_unpicklable_object_of_a_class_needing_arguments_is_skipped(clause) -> None:
    class Local(ReferenceImplementation):  # a local class: neither it nor its instances pickle
        name = "local"

    res = run_clause(clause, Local())
    assert res.outcome == "skipped", (res.outcome, res.message)
    assert "cannot be sent to spawned ranks" in res.message


def test_an_object_that_does_not_pickle_is_sent_as_its_class() -> None:
    impl = ReferenceImplementation()
    impl.unpicklable = lambda: None  # the instance no longer pickles; the class does and builds with no arguments
    assert ddp_checks.portable(impl) is ReferenceImplementation
    assert ddp_checks.portable(ReferenceImplementation()) is not ReferenceImplementation
