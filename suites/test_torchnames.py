"""The one converter between dtype names and torch dtypes, the one map of grad modes, and the case record's JSON."""

from __future__ import annotations

import pytest
import torch

from conformance.clauses import cases
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import GRAD_MODES, dtype_name, dtype_of, grad_mode, grad_mode_code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
def test_dtype_names_round_trip(dtype: torch.dtype) -> None:
    assert dtype_of(dtype_name(dtype)) is dtype
    assert dtype_of(str(dtype)) is dtype and dtype_of(dtype) is dtype


@pytest.mark.parametrize("bad", ["fp32", "nf4", "Tensor", ""])
def test_unknown_dtype_name_is_one_line(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown dtype .*torch dtype name"):
        dtype_of(bad)


def test_grad_modes_enter_what_they_name() -> None:
    seen = {}
    for name in GRAD_MODES:
        with torch.no_grad(), grad_mode(name):  # from no_grad, so "grad" must turn grad on again
            seen[name] = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    assert seen == {"grad": (True, False), "no_grad": (False, False), "inference_mode": (False, True)}
    assert grad_mode_code("grad") == "torch.enable_grad()" and grad_mode_code("no_grad") == "torch.no_grad()"
    with pytest.raises(ValueError, match="unknown grad mode 'nograd'"):
        grad_mode("nograd")


def test_base_case_json_round_trips_and_builds_what_it_says() -> None:
    bases = cases.with_storage_dtypes(cases.base_cases(4, dtypes=cases.COMPUTE_DTYPES)) + cases.base_cases(8)
    for case in bases:
        assert cases.BaseCase.from_json(case.to_json()) == case
    case = bases[1]
    layer = case.build(seed=3)
    want = qlayers.make_base_layer(case.in_features, case.out_features, seed=3, bits=4, quant_type=case.quant_type,
                                   double_quant=case.double_quant, compute_dtype=case.compute_dtype,
                                   weight_dtype=case.weight_dtype)
    assert qlayers.quant_settings(layer) == qlayers.quant_settings(want)
    assert torch.equal(qlayers.dequantize(layer), qlayers.dequantize(want))
    assert torch.equal(layer.bias, want.bias)
