"""The reference's dense twins (``conformance.reference`` over a plain ``torch.nn.Linear``, ``bits`` ``DENSE``): LoRA,
OFT and DoRA over a float64 ``nn.Linear`` holding a bitsandbytes base's dequantized weight, with the adapter tensors of
a quantized reference layer copied in, against the float64 oracle (``numerics.layer_expected``), through merge,
unmerge and a refused safe merge. Fast, CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conformance import numerics
from conformance.clauses.cases import BaseCase, fill_adapter
from conformance.clauses.interface import AdapterSpec
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import dequantize
from conformance.reference import DENSE, layer_class

NAME = "default"
#: the float64 twin against the float64 oracle: a few float64 roundings of |values| about 1
REL = 1e-12

PARAMS = {
    "lora": {"r": 4, "lora_alpha": 8},
    "lora-bias": {"r": 4, "lora_alpha": 8, "lora_bias": True},
    "oft": {"r": 4},
    "dora": {"r": 4, "lora_alpha": 8},
}
CASES = [(key, bits) for key in PARAMS for bits in (4, 8)]


def _method(key: str) -> str:
    return key.split("-")[0]


def dense_of(base: nn.Module) -> nn.Linear:
    """A float64 ``nn.Linear`` with the bitsandbytes base's dequantized weight and its bias."""
    w = dequantize(base).double()
    dense = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(w)
        if base.bias is not None:
            dense.bias.copy_(base.bias.detach().double())
    return dense.requires_grad_(False)


def pair(key: str, bits: int) -> tuple[nn.Module, nn.Module]:
    """(quantized reference layer with non-trivial adapter tensors, its float64 dense twin with them copied in)."""
    method, params = _method(key), PARAMS[key]
    impl = ReferenceImplementation()
    base = BaseCase(bits=bits).build()
    layer = impl.create(base, AdapterSpec(method=method, adapter_name=NAME, params=dict(params), dtype="float32"))
    gen = torch.Generator().manual_seed(bits * 10 + len(key))
    fill_adapter(layer, NAME, gen)
    if method == "dora":  # the magnitude off the initial norm, so m/n != 1
        mag = layer.adapter_parameters(NAME)["lora_magnitude_vector.weight"]
        with torch.no_grad():
            mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=gen))
    twin = impl.create(dense_of(base), AdapterSpec(method=method, adapter_name=NAME, params=dict(params),
                                                   dtype="float64"))
    with torch.no_grad():
        for k, t in layer.adapter_parameters(NAME).items():
            twin.adapter_parameters(NAME)[k].data.copy_(t.detach().double())
    return layer.eval(), twin.eval()


def x_of(bits: int) -> torch.Tensor:
    return torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.float64, f"{what}: dtype {got.dtype}, expected float64"
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert err <= REL * scale, f"{what}: max |diff| {err:.3g} > {REL:g} * {scale:.3g}"


@pytest.mark.parametrize(("key", "bits"), CASES)
def test_twin_is_dense_float64_with_the_same_keys(key: str, bits: int) -> None:
    layer, twin = pair(key, bits)
    assert type(twin) is layer_class(_method(key), DENSE)
    assert twin.base_layer.weight.dtype == torch.float64
    assert list(twin.adapter_parameters(NAME)) == list(layer.adapter_parameters(NAME))
    assert all(t.dtype == torch.float64 for t in twin.adapter_parameters(NAME).values())


@pytest.mark.parametrize(("key", "bits"), CASES)
def test_dense_forward_is_the_float64_oracle(key: str, bits: int) -> None:
    layer, twin = pair(key, bits)
    x = x_of(bits)
    with torch.no_grad():
        want = numerics.layer_expected(layer, _method(key), NAME, PARAMS[key], x, training=False).value
        got = twin(x)
    assert_close(got, want, f"{key} over a dense base (from {bits}-bit)")
    with torch.no_grad():  # 1-D input through the dense base too
        assert_close(twin(x[0, 0]), want[0, 0], f"{key}, 1-D input")


@pytest.mark.parametrize("key", ("lora", "dora"))
def test_dense_base_computes_in_the_input_dtype(key: str) -> None:
    """A float32 input through the float64 twin: the base step is F.linear in float32 (the weight and bias cast to
    the input's dtype), the output float32."""
    layer, twin = pair(key, 4)
    x = x_of(4)
    with torch.no_grad():
        want = numerics.layer_expected(layer, key, NAME, PARAMS[key], x, training=False).value
        got = twin(x.float())
    assert got.dtype == torch.float32
    err, scale = float((got.double() - want).abs().max()), float(want.abs().max())
    assert err <= 1e-5 * scale, f"{key}: float32 input, max |diff| {err:.3g} > 1e-5 * {scale:.3g}"


@pytest.mark.parametrize(("key", "bits"), CASES)
def test_dense_merge_unmerge_round_trip(key: str, bits: int) -> None:
    _, twin = pair(key, bits)
    x = x_of(bits)
    w0 = twin.base_layer.weight.detach().clone()
    b0 = twin.base_layer.bias.detach().clone()
    with torch.no_grad():
        y0 = twin(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's dense layers merge silently: no rounding to warn about
        twin.merge()
    assert twin.merged_adapters == [NAME]
    assert twin.base_layer.weight.dtype == torch.float64 and type(twin.base_layer) is nn.Linear
    assert not torch.equal(twin.base_layer.weight, w0), "merge left the dense weight as it was"
    with torch.no_grad():
        assert_close(twin(x), y0, f"{key}: merged forward vs unmerged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin.unmerge()
    assert not twin.merged
    assert_close(twin.base_layer.weight.detach(), w0, f"{key}: weight after unmerge")
    assert_close(twin.base_layer.bias.detach(), b0, f"{key}: bias after unmerge")
    with torch.no_grad():
        assert_close(twin(x), y0, f"{key}: forward after unmerge")


@pytest.mark.parametrize("bits", (4, 8))
def test_quantized_merge_still_warns_about_rounding(bits: int) -> None:
    layer, _ = pair("lora", bits)
    with pytest.warns(UserWarning, match=f"to {bits}-bit linear may get different generations due to rounding"):
        layer.merge()


@pytest.mark.parametrize(("key", "bits"), CASES)
def test_dense_safe_merge_refuses_nan(key: str, bits: int) -> None:
    _, twin = pair(key, bits)
    first = "oft_R.weight" if _method(key) == "oft" else "lora_A.weight"
    with torch.no_grad():
        twin.adapter_parameters(NAME)[first][0, 0] = float("nan")
    w0 = twin.base_layer.weight.detach().clone()
    b0 = twin.base_layer.bias.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        twin.merge(safe_merge=True)
    assert not twin.merged
    assert torch.equal(twin.base_layer.weight.view(torch.int64), w0.view(torch.int64)), "weight changed"
    assert torch.equal(twin.base_layer.bias.view(torch.int64), b0.view(torch.int64)), "bias changed"


def test_dense_layer_refuses_a_bitsandbytes_base() -> None:
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        layer_class("lora", DENSE)(BaseCase(bits=4).build(), NAME, r=4)
