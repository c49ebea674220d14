"""The DoRA merge numbers: ``numerics.dora.dora_merge_error`` into a weight that is not the one its norm is taken on,
``numerics.merge.dora_pair_merged`` (two adapters in sequence) and ``roundtrip_bound``'s DoRA branch,
against ``conformance.numerics.dora`` and an independent float64 computation."""

from __future__ import annotations

import pytest
import torch

from conformance.clauses import cases
from conformance.numerics import dora as nd
from conformance.numerics import merge as nm
from conformance.numerics.requant import hypothetical_requant_bound
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.reference.dora import DoraLinear4bit

S = 16.0 / 4


def _layer() -> DoraLinear4bit:
    base = qlayers.make_base_layer(64, 48, bits=4, seed=3)
    layer = DoraLinear4bit(base, "a", r=4, lora_alpha=16.0, init_lora_weights=False)
    layer.add_adapter("b", r=4, lora_alpha=16.0, init_lora_weights=False)
    for i, name in enumerate(("a", "b")):
        cases.fill_adapter(layer, name, torch.Generator().manual_seed(10 + i))
        cases.trained_magnitude(layer, name, torch.Generator().manual_seed(20 + i))
    return layer


def _exact(w0: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, s B A) in float64, the norm on ``w0``."""
    a, b = tensors["lora_A.weight"].detach().double(), tensors["lora_B.weight"].detach().double()
    delta = S * (b @ a)
    f = tensors[nd.MAGNITUDE].detach().double() / torch.linalg.vector_norm(w0 + delta, dim=1)
    return f, delta


def test_merge_into_another_weight_scales_it_by_the_factor_of_the_norm_weight() -> None:
    """f (W + s B A) with f from the norm on ``norm_on``, against an independent float64 computation."""
    layer = _layer()
    w0 = qlayers.dequantize(layer.base_layer).double()
    t = layer.adapter_parameters("a")
    w = w0 * 1.5
    value, bound, f = nd.dora_merge_error(w, t, S, norm_on=w0)
    fa, da = _exact(w0, t)
    torch.testing.assert_close(f.value, fa, rtol=1e-12, atol=0)
    torch.testing.assert_close(value, fa[:, None] * (w + da), rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(bound).all())


def test_merge_bound_grows_with_the_errors() -> None:
    layer = _layer()
    w0 = qlayers.dequantize(layer.base_layer).double()
    t = layer.adapter_parameters("a")
    _, plain, _ = nd.dora_merge_error(w0, t, S)
    err = torch.full_like(w0, 1e-3)
    _, into, _ = nd.dora_merge_error(w0, t, S, w_err=err, norm_on=w0)
    _, normed, _ = nd.dora_merge_error(w0, t, S, norm_on=w0, norm_err=err)
    assert bool((into > plain).all()) and bool((normed > plain).all())


def test_pair_merged_target_is_the_forward_composition() -> None:
    """f_b (f_a (W0 + d_a) + d_b) with both norms on W0 (the forward's), not on the weight merged into."""
    layer = _layer()
    w0 = qlayers.dequantize(layer.base_layer).double()
    ta, tb = layer.adapter_parameters("a"), layer.adapter_parameters("b")
    fa, da = _exact(w0, ta)
    fb, db = _exact(w0, tb)
    target, bound = nm.dora_pair_merged(layer.base_layer, w0, (ta, S), (tb, S))
    torch.testing.assert_close(target, fb[:, None] * (fa[:, None] * (w0 + da) + db), rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(bound).all()) and bool((bound > 0).all())
    # the bound holds for the reference's own two-adapter merge (both norms on the W0 the merge started from)
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        layer.merge()
    w2 = qlayers.dequantize(layer.base_layer).double()
    assert bool(((w2 - target).abs() <= bound + qbounds.weight_bound(layer.base_layer)).all())
    # the norm on the weight merged into (f_a (W0 + d_a) + d_b) is another number
    wrong = tb[nd.MAGNITUDE].detach().double() / torch.linalg.vector_norm(
        fa[:, None] * (w0 + da) + db, dim=1)
    assert float((wrong - fb).abs().max()) > 1e-2


def test_roundtrip_bound_dora_needs_w0_and_wb1() -> None:
    layer = _layer()
    w0 = qlayers.dequantize(layer.base_layer).double()
    zeros = torch.zeros_like(w0)
    params = {"r": 4, "lora_alpha": 16.0}
    with pytest.raises(ValueError, match="w0="):
        nm.roundtrip_bound(layer, "dora", "a", params, zeros, w0, zeros)
    wb = hypothetical_requant_bound(layer.base_layer, w0.float())
    got = nm.roundtrip_bound(layer, "dora", "a", params, zeros, w0, wb, w0=w0, wb1=wb)
    _, _, f = nd.dora_merge_error(w0, layer.adapter_parameters("a"), S)
    torch.testing.assert_close(got, nd.dora_roundtrip_bound(w0, layer.adapter_parameters("a"), S, f, wb, wb))
