"""The model area: its clauses pass on the reference and fail on their broken twins; the reference's model entry
attaches, merges, saves and loads what it says; transformers' own re-save failure is listed, not hidden."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conformance import tinymodels  # noqa: E402
from conformance.clauses.broken import more_twins, twins  # noqa: E402
from conformance.clauses.clause import get  # noqa: E402
from conformance.clauses.interface import AdapterSpec  # noqa: E402
from conformance.clauses.model import cases as mcases  # noqa: E402
from conformance.core import upstream  # noqa: E402
from conformance.impls.reference import ReferenceImplementation  # noqa: E402
from conformance.testing import broken_twin_tests, run_clause  # noqa: E402

AREAS = {"model"}
BROKEN = twins(AREAS)

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)


@pytest.mark.parametrize(("clause_id", "impl"), more_twins(AREAS), ids=[b.name for _, b in more_twins(AREAS)])
def test_more_twins_fail(clause_id: str, impl: object) -> None:
    res = run_clause(get(clause_id), impl)
    assert res.outcome == "failed", res.message


def test_reference_entry_round_trip(tmp_path) -> None:
    """attach -> save_adapter -> load_adapter onto a fresh base gives the same adapter tensors; merge_and_unload
    leaves bitsandbytes layers only."""
    entry = ReferenceImplementation().model
    spec = AdapterSpec("lora", params={"r": 4, "lora_alpha": 8})
    model = entry.attach(tinymodels.load_quantized("llama", 4), mcases.TARGETS, spec)
    layers = entry.adapter_layers(model)
    assert sorted(layers) == mcases.targeted(tinymodels.load_quantized("llama", 4))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_()
    entry.save_adapter(model, str(tmp_path))
    again = entry.load_adapter(tinymodels.load_quantized("llama", 4), str(tmp_path))
    for name, layer in entry.adapter_layers(again).items():
        assert torch.equal(layer.lora_B["default"].weight, layers[name].lora_B["default"].weight)
    merged = entry.merge_and_unload(again)
    assert not entry.adapter_layers(merged)
    assert set(mcases.targeted(merged)) == set(layers)


def test_the_resave_failure_is_listed_for_transformers_only() -> None:
    entry = next(e for e in upstream.load() if e.key == upstream.QUANTIZED_CHECKPOINT_RESAVE)
    assert entry.library == "transformers"
    assert entry.applies({"transformers": "5.25.0", "bitsandbytes": "0.50.2"}, lambda f: True)
    assert not entry.applies({"transformers": "4.57.6"}, lambda f: True)
    assert not entry.applies("0.50.2", lambda f: True)  # a bitsandbytes version alone: not this library's entry
