"""PEFT's initializations that read the base, through the wrapper (``conformance.impls.peft_inits``): found by feature
detection, driven the way PEFT documents them (preprocessing first, LoftQ after ``get_peft_model``), LoftQ skipped
where PEFT cannot compute it, and every declared initialization reported by INIT-CREATE."""

from __future__ import annotations

import pytest
import torch

from conformance.clauses import cases
from conformance.clauses.clause import get
from conformance.clauses.init import cases as icases
from conformance.clauses.interface import AdapterSpec
from conformance.core.inits import TABLE, Init
from conformance.testing import run_clause

peft = pytest.importorskip("peft")

from conformance.impls.peft import PeftImplementation  # noqa: E402


@pytest.fixture(scope="module")
def impl() -> PeftImplementation:
    return PeftImplementation()


def test_every_init_the_release_has_is_declared(impl: PeftImplementation) -> None:
    from conformance.impls.peft_inits import WHERE, _find

    have = {i for i in Init if _find(WHERE[i]) is not None}
    assert have, "PEFT has none of the initializations"
    assert {TABLE[i].capability for i in have} <= impl.capabilities
    assert not {TABLE[i].capability for i in set(Init) - have} & impl.capabilities


def test_loftq_is_unavailable_off_cuda_with_the_reason(impl: PeftImplementation) -> None:
    why = impl.init_unavailable("loftq", "cpu")
    assert why and "loftq_utils.py" in why and "cuda" in why
    assert impl.init_unavailable("loftq", "cuda") is None
    assert impl.init_unavailable("pissa", "cpu") is None


def test_olora_writes_the_residual_into_the_base(impl: PeftImplementation) -> None:
    """PEFT's own OLoRA runs on a default 4-bit base: the adapter holds the top of the weight and the base changed."""
    base = cases.BaseCase(4).build()
    before = base.weight.data.clone()
    layer = impl.create(base, AdapterSpec("lora", params=icases.params(Init.OLORA)))
    b = layer.adapter_parameters("default")["lora_B.weight"]
    assert float(b.detach().abs().max()) > 0
    assert not torch.equal(layer.layer.base_layer.weight.data, before)


def test_init_create_reports_each_initialization_per_bit_width(impl: PeftImplementation) -> None:
    res = run_clause(get("INIT-CREATE"), impl)
    assert res.outcome == "failed", res.message  # PEFT 29-32 (docs/findings.md)
    keys = {k for k in res.details if k.startswith("outcomes.")}
    want = {f"outcomes.{i}.{b}bit" for i in Init if i is not Init.LOFTQ for b in (4, 8)}
    assert want <= keys, sorted(want - keys)
    assert res.details["outcomes.pissa.4bit"]["refused"] >= 1  # uint8 storage: PEFT's TypeError
