"""DoRA in the lifecycle, protocol and moves clauses: the reference passes them in the ``dora/*`` families, and DoRA
bugs fail them there: an unmerge that forgets the magnitude factor (``W1 - s B A``, LoRA's unmerge) leaves the base
beyond DoRA's round-trip bound, a layer whose ``adapter_parameters`` lacks the magnitude breaks the protocol, and a
magnitude that is not a parameter of the layer is left behind by a cast. Fast, CPU, reference only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conformance.clauses.broken import Broken, bind
from conformance.clauses.interface import AdapterSpec
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.numerics.dora import MAGNITUDE
from conformance.testing import restricted

DORA = ("dora/4bit", "dora/8bit")


pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("clause_id", [
    "LIFECYCLE-MERGED-DISABLED", "LIFECYCLE-MERGED-DELETE", "LIFECYCLE-SUBSET-UNMERGE", "LIFECYCLE-MERGE-AFTER-EVAL",
    "LIFECYCLE-MERGE-AFTER-STEP", "LIFECYCLE-TRAINABLE", "LAYER-PROTOCOL-SURFACE",
])
def test_the_reference_passes_in_the_dora_families(clause_id: str) -> None:
    res = run_clause(restricted(clause_id, "dora"), ReferenceImplementation())
    assert res.outcome == "passed", res.message
    for fam in DORA:
        assert res.families[fam].outcome == "passed" and res.families[fam].run > 0, res.families[fam]


def test_subset_unmerge_checks_the_stacked_dora_forward() -> None:
    res = run_clause(restricted("LIFECYCLE-SUBSET-UNMERGE", "dora"), ReferenceImplementation())
    assert 0 < res.measurements["ratio.subset_stack_forward.dora.4bit"] <= 1.0


def _additive_unmerge(layer: nn.Module, spec: AdapterSpec) -> None:
    """DoRA unmerged as LoRA is: ``W1 - s B A``, the magnitude factor the merge applied left in the base."""
    if spec.method != "dora":
        return

    def unmerged(self: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        self._merge_norms.pop(name, None)
        return weight - self.get_delta_weight(name).detach().float(), bias

    bind(layer, "_unmerged_weights", unmerged)


@pytest.mark.parametrize("clause_id", ["LIFECYCLE-MERGED-DISABLED", "LIFECYCLE-SUBSET-UNMERGE"])
def test_an_unmerge_that_forgets_the_magnitude_fails(clause_id: str) -> None:
    res = run_clause(restricted(clause_id, "dora"), Broken("additive-unmerge", _additive_unmerge))
    for fam in DORA:
        assert res.families[fam].outcome == "failed", res.families[fam]


def _no_magnitude_key(layer: nn.Module, spec: AdapterSpec) -> None:
    orig = layer.adapter_parameters
    bind(layer, "adapter_parameters",
         lambda self, name: {k: v for k, v in orig(name).items() if k != MAGNITUDE})


def test_the_protocol_needs_the_magnitude_among_the_adapter_parameters() -> None:
    res = run_clause(restricted("LAYER-PROTOCOL-SURFACE", "dora", "lora"), Broken("no-magnitude-key", _no_magnitude_key))
    for fam in DORA:
        assert res.families[fam].outcome == "failed" and MAGNITUDE in res.families[fam].message, res.families[fam]
    assert res.families["lora/4bit"].outcome == "passed"


def _magnitude_not_a_parameter(layer: nn.Module, spec: AdapterSpec) -> None:
    """The magnitude kept as a plain tensor attribute: ``Module._apply`` (``.half()``, ``.to()``) never sees it."""
    if spec.method != "dora":
        return
    holder = layer.lora_magnitude_vector[spec.adapter_name]
    value = holder.weight.detach().clone()
    del holder.weight
    object.__setattr__(holder, "weight", value)


def test_a_magnitude_left_behind_by_a_cast_fails_move_dtype() -> None:
    res = run_clause(restricted("MOVE-DTYPE", "dora"), Broken("magnitude-not-a-parameter", _magnitude_not_a_parameter))
    fam = res.families["dora/8bit"]
    assert fam.outcome == "failed" and "magnitude did not follow" in fam.message, fam
