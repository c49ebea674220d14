"""Direct tests of the reference layers (conformance.reference): behaviour and error messages."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from conformance.clauses import cases
from conformance.quant import dequantize, make_base_layer, snapshot
from conformance.quant.layers import BaseLayerError
from conformance.reference import (
    LoraLinear4bit,
    LoraLinear8bit,
    OftLinear4bit,
    OftLinear8bit,
    layer_class,
    nan_message,
    rotation,
)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def lora(bits: int = 4, **kw: object) -> nn.Module:
    kw.setdefault("r", 4)
    return layer_class("lora", bits)(make_base_layer(64, 48, bits=bits), "default", **kw)


def oft(bits: int = 4, **kw: object) -> nn.Module:
    kw.setdefault("r", 4)
    return layer_class("oft", bits)(make_base_layer(64, 48, bits=bits), "default", **kw)


# -- construction errors ---------------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_lora_rank_must_be_positive_int(r: object) -> None:
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lora(r=r)


def test_lora_dropout_range() -> None:
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        lora(lora_dropout=1.0)


def test_lora_bias_needs_base_bias() -> None:
    base = make_base_layer(64, 48, bits=4, bias=False)
    with pytest.raises(ValueError, match="lora_bias=True needs a base layer with a bias"):
        LoraLinear4bit(base, "default", r=4, lora_bias=True)


@pytest.mark.parametrize(("r", "bs", "match"), [
    (5, 0, r"r=5 does not divide in_features=64; valid values: \[1, 2, 4, 8, 16, 32, 64\]"),
    (0, 12, "oft_block_size=12 does not divide in_features=64"),
    (4, 16, "set exactly one of r"),
    (0, 0, "set exactly one of r"),
    (64, 0, "block size 1 has no rotation parameters"),
])
def test_oft_layout_errors(r: int, bs: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        oft(r=r, oft_block_size=bs)


def test_wrong_base_layer_type() -> None:
    with pytest.raises(BaseLayerError, match="expected a bitsandbytes quantized linear layer"):
        LoraLinear4bit(nn.Linear(64, 48), "default")
    with pytest.raises(BaseLayerError, match="use the 8-bit variant"):
        LoraLinear4bit(make_base_layer(64, 48, bits=8), "default")
    with pytest.raises(BaseLayerError, match="use the 4-bit variant"):
        OftLinear8bit(make_base_layer(64, 48, bits=4), "default")


def test_unquantized_base_is_refused() -> None:
    import bitsandbytes as bnb

    raw = bnb.nn.Linear4bit(64, 48)
    with pytest.raises(BaseLayerError, match="quantizes on the first move to a device"):
        LoraLinear4bit(raw, "default")


def test_adapter_names_rules() -> None:
    layer = lora(init_lora_weights=False)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="not a string"):
        layer(x, adapter_names="default")
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        layer(x, adapter_names=["default"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        layer(x, adapter_names=["default", "nope"])
    layer.merge()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        layer(x, adapter_names=["default", "__base__"])


def test_input_shape_error_names_in_features() -> None:
    with pytest.raises(ValueError, match="in_features=64"):
        lora()(torch.randn(3, 63))
    with pytest.raises(ValueError, match="0-d tensor"):
        oft()(torch.tensor(1.0))


def test_adapter_registry_errors() -> None:
    layer = lora()
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", r=2)
    with pytest.raises(ValueError, match="reserved"):
        layer.add_adapter("__base__", r=2)
    with pytest.raises(TypeError, match="non-empty string"):
        layer.add_adapter("", r=2)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge\\(\\) before deleting"):
        layer.delete_adapter("default")
    with pytest.raises(TypeError, match="list of strings"):
        layer.merge(adapter_names="default")


# -- behaviour -------------------------------------------------------------------------------

@pytest.mark.parametrize(("rs", "want"), [(False, 16.0 / 4), (True, 16.0 / 2)])
def test_lora_scaling(rs: bool, want: float) -> None:
    layer = lora(lora_alpha=16.0, use_rslora=rs, init_lora_weights=False)
    assert layer.scaling["default"] == want
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.get_delta_weight("default"), want * (b @ a))


@pytest.mark.parametrize("cls", [LoraLinear4bit, LoraLinear8bit, OftLinear4bit, OftLinear8bit])
def test_merge_and_unmerge_warn_verbatim(cls: type) -> None:
    bits, method = cls.bits, cls.method
    layer = cls(make_base_layer(64, 48, bits=bits), "default", r=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
        layer.merge()
        layer.unmerge()
        layer.unmerge()
    texts = [str(w.message) for w in caught]
    assert texts == [
        f"Merge {method} module to {bits}-bit linear may get different generations due to rounding errors.",
        "All adapters are already merged, nothing to do.",
        f"Unmerge {method} module to {bits}-bit linear may get different generations due to rounding errors.",
        "Already unmerged. Nothing to do.",
    ]


def test_nan_message_is_peft_verbatim() -> None:
    assert nan_message("x") == "NaNs detected in the merged weights. The adapter x seems to be broken"


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_safe_merge_refusal_leaves_base_bit_identical(method: str) -> None:
    layer = lora(init_lora_weights=False) if method == "lora" else oft(init_weights=False)
    key = "lora_A.weight" if method == "lora" else "oft_R.weight"
    with torch.no_grad():
        layer.adapter_parameters("default")[key].view(-1)[0] = math.inf
    snap = snapshot(layer.base_layer)
    with pytest.raises(ValueError, match="The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert snap.differences(snapshot(layer.base_layer)) == []
    assert not layer.merged
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    assert any(issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message) for w in caught)


def test_disabled_while_merged_unmerges_on_forward() -> None:
    layer = lora(init_lora_weights=False)
    x = torch.randn(2, 64)
    layer.merge()
    layer.enable_adapters(False)
    y = layer(x)
    assert not layer.merged
    torch.testing.assert_close(y, layer.base_layer(x), rtol=0, atol=0)


def test_oft_multi_adapter_merge_matches_forward_order() -> None:
    """Rotations do not commute: merging [a, b] must realise x R_a R_b (reference fix, clause MERGE-MULTI)."""
    layer = OftLinear8bit(make_base_layer(64, 48, bits=8), "a", r=4, init_weights=False)
    layer.add_adapter("b", r=4, init_weights=False)
    for name, seed in (("a", 1), ("b", 2)):
        cases.fill_adapter(layer, name, torch.Generator().manual_seed(seed), scale=6.0)
    layer.set_adapter(["a", "b"])
    x = torch.randn(4, 64)
    with torch.no_grad():
        y_u = layer(x)
        layer.merge()
        y_m = layer(x)
    assert layer.merged_adapters == ["b", "a"]
    assert float((y_m - y_u).abs().max()) < 0.1 * float(y_u.abs().max())
    with torch.no_grad():
        w0 = dequantize(layer.base_layer)
        layer.unmerge()
    assert not layer.merged and not torch.equal(w0, dequantize(layer.base_layer))


@pytest.mark.parametrize("n", range(2, 9))
def test_reference_neumann_error_is_q_to_the_n_minus_1(n: int) -> None:
    """(I - Q) sum_{k<n-1} (-Q)^k - R = R (-Q)^(n-1), so its 2-norm is exactly ||Q||_2^(n-1)."""
    v = torch.randn(3, 28, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    q = rotation.skew(v, 8)
    q = q * (0.5 / torch.linalg.matrix_norm(q, ord=2))[:, None, None]
    err = torch.linalg.matrix_norm(rotation.cayley(q, neumann_terms=n) - rotation.cayley(q), ord=2)
    torch.testing.assert_close(err, torch.full_like(err, 0.5 ** (n - 1)), rtol=1e-9, atol=1e-12)


def test_peft_neumann_series_converges_to_the_transpose() -> None:
    """Finding: PEFT 0.21's series I + 2Q + 2Q^2 + ... + Q^(n-1) = (I + Q) sum Q^k -> (I + Q)(I - Q)^{-1} = R^T."""
    v = torch.randn(2, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = rotation.skew(v, 8)
    q = q * (0.5 / torch.linalg.matrix_norm(q, ord=2))[:, None, None]
    eye = torch.eye(8, dtype=torch.float64).expand_as(q)
    series = sum(torch.linalg.matrix_power(q, k) for k in range(0, 40))
    peft = (eye + q) @ series
    r = rotation.cayley(q)
    torch.testing.assert_close(peft, r.transpose(-2, -1), rtol=0, atol=1e-10)
    assert float(torch.linalg.matrix_norm(peft - r, ord=2).max()) > 0.5


def test_coft_projection_radius() -> None:
    v = torch.randn(4, 28, generator=torch.Generator().manual_seed(0)) * 3
    p = rotation.coft_project(v, 8, 0.1)
    norms = torch.linalg.matrix_norm(rotation.skew(p, 8), ord="fro")
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1 / 2), rtol=1e-6, atol=0)
    small = v * 1e-4
    torch.testing.assert_close(rotation.coft_project(small, 8, 0.1), small, rtol=0, atol=0)


def test_default_init_is_identity() -> None:
    for layer in (lora(), oft()):
        x = torch.randn(3, 64)
        assert torch.equal(layer(x), layer.base_layer(x))
