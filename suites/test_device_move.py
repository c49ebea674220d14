"""A reference layer moved between CPU and CUDA keeps every bitsandbytes tensor with its weight.

Clause STATE-VALID-NEVER-RAISES covers device moves in the stateful machine; these tests pin the
one mechanism behind it (``conformance.quant.layers.follow_weight_device``) and show the
bitsandbytes 0.50.2 behaviour that makes it necessary: ``nn.Module.to()`` on a *parent* of a
``bnb.nn.Linear8bitLt`` leaves ``CB``/``SCB`` on the old device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conformance import numerics
from conformance.clauses import cases
from conformance.quant import layers as qlayers
from conformance.reference import layer_class

pytestmark = pytest.mark.gpu

CASES = [("lora", 4), ("lora", 8), ("oft", 4), ("oft", 8)]


PARAMS = {"lora": {"r": 4, "lora_alpha": 8}, "oft": {"r": 4}}


def _layer(method: str, bits: int) -> nn.Module:
    layer = layer_class(method, bits)(qlayers.make_base_layer(32, 24, bits=bits, seed=1), "a", **PARAMS[method])
    cases.fill_adapter(layer, "a", torch.Generator().manual_seed(2))
    return layer.eval()


@pytest.mark.parametrize(("method", "bits"), CASES)
def test_round_trip_cpu_cuda_cpu_keeps_state_and_output(method: str, bits: int) -> None:
    layer = _layer(method, bits)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = layer(x)  # Linear8bitLt copies CB/SCB into its MatmulLtState on the first forward
        want = numerics.layer_expected(layer, method, "a", PARAMS[method], x)
        layer.to("cuda")
        assert qlayers.tensors_off_device(layer, "cuda") == []
        on_cuda = layer(x.cuda())
        torch.cuda.synchronize()
        layer.to("cpu")
        assert qlayers.tensors_off_device(layer, "cpu") == []
        back = layer(x)
    assert want.ratio(on_cuda) <= 1.0, want.describe(on_cuda)
    torch.testing.assert_close(back, before, atol=0, rtol=0)  # same kernels, same stored bytes


@pytest.mark.parametrize(("method", "bits"), CASES)
def test_merge_and_unmerge_after_a_move_keep_everything_on_cuda(method: str, bits: int) -> None:
    layer = _layer(method, bits).to("cuda")  # quantized on the CPU, then moved
    assert qlayers.tensors_off_device(layer, "cuda") == []
    x = torch.randn(3, 32, device="cuda")
    with torch.no_grad():
        layer.merge()
        torch.cuda.synchronize()
        assert qlayers.tensors_off_device(layer, "cuda") == []
        got = layer(x)
        torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    layer.unmerge()
    torch.cuda.synchronize()
    assert qlayers.tensors_off_device(layer, "cuda") == []


def test_bitsandbytes_parent_move_leaves_int8_state_behind() -> None:
    """The upstream behaviour (bitsandbytes 0.50.2): a plain container moved to CUDA keeps the
    8-bit statistics of its Linear8bitLt on the CPU. If a bitsandbytes release moves them, this
    test fails and follow_weight_device can be retired for that release."""
    base = qlayers.make_base_layer(32, 24, bits=8, seed=1)
    with torch.no_grad():
        base(torch.randn(2, 32))
    parent = nn.Sequential(base).to("cuda")
    left = qlayers.tensors_off_device(parent, "cuda")
    assert any("SCB" in s for s in left), left
