"""Area ``moves`` (MOVE-DTYPE) and the 4-bit ``quant_storage`` axis it stands on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conformance.clauses import cases
from conformance.clauses.broken import twins
from conformance.clauses.moves.cases import CASTS
from conformance.core import upstream
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate
from conformance.testing import broken_twin_tests

AREAS = {"moves"}
BROKEN = twins(AREAS)

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("storage", cases.QUANT_STORAGES)
def test_quant_storage_is_kept_by_a_requantization(storage: torch.dtype) -> None:
    layer = qlayers.make_base_layer(64, 48, quant_storage=storage)
    assert layer.weight.dtype == storage and layer.weight.quant_storage == storage
    expected = qvalidate.expected_of(layer, at_merge=True)
    w = qlayers.dequantize(layer)
    qlayers.requantize(layer, w)
    assert layer.weight.dtype == storage and qvalidate.base_problems(layer, expected) == []
    assert torch.equal(qlayers.dequantize(layer), w)


def test_the_case_record_carries_the_storage() -> None:
    c = cases.BaseCase(4, quant_storage=torch.bfloat16)
    assert c.label.endswith("-qs-bfloat16") and c.layer_kwargs()["quant_storage"] == torch.bfloat16
    assert cases.BaseCase.from_json(c.to_json()) == c
    assert "quant_storage" not in cases.BaseCase(4).layer_kwargs()
    assert "quant_storage" not in cases.BaseCase(8, quant_storage=torch.bfloat16).layer_kwargs()
    assert {c.quant_storage for c in cases.base_matrix(4)} == {None, *cases.QUANT_STORAGES[1:]}


def test_a_validity_record_sees_a_changed_storage() -> None:
    layer = qlayers.make_base_layer(64, 48, quant_storage=torch.bfloat16)
    expected = qvalidate.expected_of(layer, at_merge=True)
    layer.half()  # bitsandbytes casts the floating payload
    assert any("quant_storage" in p or "dtype" in p for p in qvalidate.base_problems(layer, expected))


def test_the_cast_table_names_the_dtype_each_cast_gives() -> None:
    m = torch.nn.Linear(2, 2)
    for _name, (cast, dtype) in CASTS.items():
        assert cast(m).weight.dtype == dtype


def test_the_listed_float_storage_cast_reproduces_with_bitsandbytes_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """The entry's reproducer (run in this process: it imports bitsandbytes and torch only) exits 1 on a listed
    bitsandbytes version."""
    import runpy

    import bitsandbytes as bnb

    entry = next(e for e in upstream.load() if e.key == upstream.FLOAT_STORAGE_CAST)
    if not upstream.in_range(bnb.__version__, entry.bitsandbytes):
        pytest.skip(f"bitsandbytes {bnb.__version__} is outside the entry's range {entry.bitsandbytes}")
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / entry.reproducer), run_name="__main__")
    assert done.value.code == 1, capsys.readouterr().out
    assert "reproduced" in capsys.readouterr().out
