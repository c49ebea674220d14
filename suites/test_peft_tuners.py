"""PEFT's twin methods through the wrapper (``conformance.impls.peft_tuners``): built as users get them, the same
adapter tensors over a bitsandbytes base and over a dense one, limitations found from PEFT's own classes."""

from __future__ import annotations

import pytest
import torch

from conformance.clauses import cases
from conformance.clauses.interface import AdapterSpec
from conformance.clauses.twin import cases as tcases
from conformance.core.vocabulary import TWIN_METHODS, Capability, Method

peft = pytest.importorskip("peft")

from conformance.impls.peft import PeftImplementation  # noqa: E402


@pytest.fixture(scope="module")
def impl() -> PeftImplementation:
    return PeftImplementation()


def test_every_twin_method_with_a_config_class_is_declared(impl: PeftImplementation) -> None:
    from conformance.core.methods import row

    have = {m for m in TWIN_METHODS if hasattr(peft, row(m).peft_config)}
    assert have and have <= impl.methods
    assert {Capability.DENSE_TWIN, Capability.MERGE} <= impl.capabilities


def test_merge_limitations_come_from_peft_classes(impl: PeftImplementation) -> None:
    """AdaLoRA's and IA3's bnb classes define no merge of their own (PEFT 0.21.2); the rest do."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    limited = set(impl.limitations.get(Capability.MERGE, {}))
    for m in sorted(TWIN_METHODS & impl.methods, key=str):
        layer = impl.create(cases.BaseCase(4).build(), AdapterSpec(str(m), params=tcases.params(m))).layer
        inherits = type(layer).merge is BaseTunerLayer.merge
        assert inherits == (m in limited), f"{m}: {type(layer).__qualname__}.merge inherited={inherits}"


@pytest.mark.parametrize("method", sorted(str(m) for m in TWIN_METHODS))
@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_class_chosen_and_tensors_named_alike_on_both_bases(impl: PeftImplementation, method: str,
                                                                bits: int) -> None:
    """The quantized layer is PEFT's bitsandbytes class (a bnb.py method) or the generic layer over the bnb base,
    never the dense class over packed bytes; the dense twin has the same adapter tensor names and shapes."""
    if Method(method) not in impl.methods:
        pytest.skip(f"peft {peft.__version__} has no {method}")
    base = cases.BaseCase(bits).build()
    layer = impl.create(base, AdapterSpec(method, params=tcases.params(method)))
    module = type(layer.layer).__module__
    assert module.endswith(".bnb") or module.endswith(".layer"), module
    if module.endswith(".layer"):  # the generic backend: it must have found one for the bnb base
        assert getattr(layer.layer, "quantization_backend", None) is not None, f"{method}: no quantization backend"
    dense = impl.create(tcases.dense_base(base), AdapterSpec(method, params=tcases.params(method), dtype="float64"))
    q, d = layer.adapter_parameters("default"), dense.adapter_parameters("default")
    assert q and set(q) == set(d)
    assert all(q[k].shape == d[k].shape for k in q)
    assert all(t.dtype == torch.float64 for t in d.values() if t.is_floating_point())


#: PEFT 0.21.2's forwards that raise on the suite's plain bases (docs/findings.md, PEFT 23: SHiRA's eval forward on an
#: 8-bit base multiplies bitsandbytes' float16 output by its float32 weight)
FORWARD_RAISES = {("shira", 8): "findings PEFT 23: SHiRA's 8-bit eval forward raises (Half and Float)"}


def _smoke_cases() -> list:
    out = []
    for m in sorted(str(m) for m in TWIN_METHODS | {Method.LORA, Method.OFT, Method.DORA}):
        for bits in (4, 8):
            reason = FORWARD_RAISES.get((m, bits))
            marks = [pytest.mark.xfail(strict=True, raises=RuntimeError, reason=reason)] if reason else []
            out.append(pytest.param(m, bits, marks=marks, id=f"{m}-{bits}bit"))
    return out


@pytest.mark.parametrize(("method", "bits"), _smoke_cases())
def test_copied_tensors_reach_the_float64_twin(impl: PeftImplementation, method: str, bits: int) -> None:
    """A smoke test of the wrapper, not a clause: the quantized layer's (perturbed) adapter tensors copied into the
    dense twin through ``adapter_parameters`` are the twin's live tensors (read back), the twin runs in float64, and
    its eval output is nearer the quantized layer's than a twin left at PEFT's initial values is."""
    if Method(method) not in impl.methods:
        pytest.skip(f"peft {peft.__version__} has no {method}")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    base = cases.BaseCase(bits).build()
    q = impl.create(base, AdapterSpec(method, params=tcases.params(method)))
    spec = AdapterSpec(method, params=tcases.params(method), dtype="float64")
    twin, fresh = impl.create(tcases.dense_base(base), spec), impl.create(tcases.dense_base(base), spec)
    for _ in range(6):  # far from the initial values, so the adapter's effect stands out of int8's input rounding
        tcases.perturb(q, gen)
    with torch.no_grad():
        for k, t in q.adapter_parameters("default").items():
            twin.adapter_parameters("default")[k].copy_(t)
    for k, t in q.adapter_parameters("default").items():
        assert torch.equal(twin.adapter_parameters("default")[k], t.detach().double()), f"{method}: {k} not live"
    x = torch.randn(3, q.in_features, generator=gen)
    for layer in (q, twin, fresh):
        layer.eval()
    with torch.no_grad():
        yt, yf = twin(x.double()), fresh(x.double())
        yq = q(x)
    assert yt.dtype == torch.float64 and yt.shape == yq.shape == (3, q.out_features)
    assert torch.isfinite(yq).all() and torch.isfinite(yt).all()
    near, far = float((yq.double() - yt).abs().max()), float((yq.double() - yf).abs().max())
    print(f"{method} {bits}-bit eval: max|quantized - twin| = {near:.3e}; against an uncopied twin {far:.3e}")
    assert near < far, f"{method} {bits}-bit: the copied twin is no nearer ({near:.3e}) than an uncopied one ({far:.3e})"
