"""The ``adapters`` implementation under test (``conformance.impls.adapters``): AdapterHub's own LoRA over bnb.

Part 1 runs everywhere: without adapters, loading ``--impl adapters`` is refused with the install line. The rest
needs adapters 1.3.0 (it lives in a venv of its own, ``nox -s "impl(adapters)"``: it requires transformers~=4.57.6)
and is skipped with that reason elsewhere:

- Part 2, the wrapper: the layer *is* the library's ``LoRALinear4bit``/``LoRALinear8bitLt`` (built by
  ``adapters.init`` in a one-layer BERT), it is the ``base_layer``, names are translated, values are the library's
  own Parameters; the capabilities are exactly what the library has.
- Part 3, no gaps filled: what the library lacks raises ``ImplementationUnsupported`` with the reason.
- Part 4, numbers: the forward is the library's, matched against the float64 value; one adapter active at a time.
- Part 5, findings: the documented adapters findings (docs/findings.md) as the wrapper meets them.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch

from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported, declared
from conformance.harness.loader import load
from conformance.quant.layers import dequantize, make_base_layer

HAS_ADAPTERS = importlib.util.find_spec("adapters") is not None
needs_adapters = pytest.mark.skipif(not HAS_ADAPTERS, reason="adapters is not installed (its own venv: nox -s "
                                    "'impl(adapters)'; see conformance/impls/adapters.py INSTALL)")
PARAMS = {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}


# -- part 1 ---------------------------------------------------------------------------------------
def test_unimportable_adapters_is_refused_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "adapters", None)  # import adapters raises ImportError
    with pytest.raises(ImplementationUnsupported, match=r"pip install adapters==1\.3\.0"):
        load("adapters")


# -- helpers ----------------------------------------------------------------------------------------
_IMPL: list = []


def _impl():
    if not _IMPL:
        _IMPL.append(load("adapters"))
    return _IMPL[0]


def _layer(bits: int = 4, **params):
    base = make_base_layer(64, 48, bits=bits)
    torch.manual_seed(0)
    return base, _impl().create(base, AdapterSpec("lora", "default", params or dict(PARAMS)))


# -- part 2 ---------------------------------------------------------------------------------------
@needs_adapters
def test_capabilities_are_exactly_the_librarys() -> None:
    impl = _impl()
    assert impl.capabilities == frozenset({"4bit", "8bit", "cuda", "unmerge", "multi_adapter", "delete_adapter",
                                           "dropout", "merge", "model"})
    for gap in ("oft", "dora", "additive_adapters", "multi_merge", "mixed_batch", "disable_adapters", "safe_merge",
                "rslora", "lora_bias", "input_cast", "prepare", "dense_twin"):
        assert gap not in impl.capabilities
        assert impl.unsupported[gap].startswith(f"adapters {impl.version()}: "), gap
    assert declared(impl).methods == frozenset({"lora"}) and declared(impl).bits == frozenset({4, 8})


@needs_adapters
@pytest.mark.parametrize("bits", [4, 8])
def test_layer_is_the_librarys_bnb_subclass_and_is_the_base_layer(bits: int) -> None:
    import bitsandbytes as bnb
    from adapters.methods.lora import LoRALinear4bit, LoRALinear8bitLt

    base, layer = _layer(bits)
    cls, bnb_cls = (LoRALinear4bit, bnb.nn.Linear4bit) if bits == 4 else (LoRALinear8bitLt, bnb.nn.Linear8bitLt)
    assert type(layer.layer) is cls and isinstance(layer.layer, bnb_cls)
    assert layer.base_layer is layer.layer is layer.model.get_submodule("encoder.layer.0.intermediate.dense")
    assert layer.base_layer.weight is base.weight  # copy_from took over the base's Parameter
    lora = layer.layer.loras["default"]
    params = layer.adapter_parameters("default")
    assert params["lora_A.weight"] is lora.lora_A and params["lora_B.weight"] is lora.lora_B
    assert params["lora_A.weight"].shape == (4, 64) and params["lora_B.weight"].shape == (48, 4)
    assert lora.scaling == 16.0 / 4
    torch.testing.assert_close(layer.get_delta_weight("default"), lora.lora_B @ lora.lora_A * 4.0, rtol=0, atol=0)
    assert not layer.merged and layer.merged_adapters == [] and layer.active_adapters == ["default"]
    assert torch.count_nonzero(params["lora_B.weight"]) > 0  # init_lora_weights=False: a non-zero B


@needs_adapters
def test_the_model_stays_outside_the_module_tree() -> None:
    _, layer = _layer()
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"layer.weight", "layer.bias", "layer.loras.default.lora_A", "layer.loras.default.lora_B"}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["layer.loras.default.lora_A",
                                                                          "layer.loras.default.lora_B"]


@needs_adapters
def test_adapter_dtype_is_the_librarys_config_dtype() -> None:
    base = make_base_layer(64, 48, bits=4, compute_dtype=torch.bfloat16)
    layer = _impl().create(base, AdapterSpec("lora", "default", dict(PARAMS), dtype="bfloat16"))
    assert {p.dtype for p in layer.adapter_parameters("default").values()} == {torch.bfloat16}


@needs_adapters
def test_default_init_is_the_base_output_bit_for_bit() -> None:
    base = make_base_layer(64, 48, bits=4)
    reference = copy.deepcopy(base)
    layer = _impl().create(base, AdapterSpec("lora", "default", {"r": 4}))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


@needs_adapters
def test_deepcopy_copies_the_model_with_the_layer() -> None:
    _, layer = _layer()
    twin = copy.deepcopy(layer)
    assert twin.model is not layer.model and twin.layer is twin.model.get_submodule("encoder.layer.0.intermediate.dense")
    assert torch.equal(twin.layer.loras["default"].lora_B, layer.layer.loras["default"].lora_B)


# -- part 3 ---------------------------------------------------------------------------------------
@needs_adapters
@pytest.mark.parametrize("method,params,match", [
    ("lora", {"r": 4, "use_rslora": True}, "use_rslora"),
    ("lora", {"r": 4, "lora_bias": True}, "bias"),
    ("lora", {"r": 4, "clone_base_output": False}, "in-place"),
    ("lora", {"r": 4, "init_lora_weights": "pissa"}, "reads the base"),
    ("oft", {"r": 4}, "no OFT"),
    ("dora", {"r": 4}, "use_dora=True"),
])
def test_options_the_library_lacks_are_refused(method: str, params: dict, match: str) -> None:
    with pytest.raises(ImplementationUnsupported, match=match):
        _impl().create(make_base_layer(64, 48), AdapterSpec(method, "default", params))


@needs_adapters
def test_unknown_parameter_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="lora_rank"):
        _impl().create(make_base_layer(64, 48), AdapterSpec("lora", "default", {"lora_rank": 4}))


@needs_adapters
def test_safe_merge_is_refused_and_nothing_merges() -> None:
    _, layer = _layer()
    with pytest.raises(ImplementationUnsupported, match="safe_merge"):
        layer.merge(safe_merge=True)
    assert not layer.merged


@needs_adapters
def test_mixed_batch_goes_to_the_library_which_takes_no_adapter_names() -> None:
    _, layer = _layer()
    with pytest.raises(TypeError, match="adapter_names"):
        layer(torch.randn(2, 64), adapter_names=["default", "__base__"])


# -- part 4 ---------------------------------------------------------------------------------------
@needs_adapters
@pytest.mark.parametrize("bits", [4, 8])
def test_forward_matches_float64(bits: int) -> None:
    base, layer = _layer(bits)
    reference = copy.deepcopy(base)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    lora = layer.layer.loras["default"]
    a, b = lora.lora_A.double(), lora.lora_B.double()
    with torch.no_grad():
        y = layer(x)
        if bits == 4:
            expected = x.double() @ dequantize(reference).double().T + reference.bias.double()
        else:  # LLM.int8 (threshold 0) rounds x row-wise as well: the base's own output
            expected = reference(x).double()
    expected = expected + (x.double() @ a.T @ b.T) * 4.0
    assert (y.double() - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


@needs_adapters
def test_one_adapter_active_at_a_time_through_the_model() -> None:
    _, layer = _layer()
    layer.add_adapter("other", r=2, lora_alpha=4, init_lora_weights=False)
    assert layer.adapter_names == ["default", "other"] and layer.active_adapters == ["default"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_default = layer(x)
        layer.set_adapter("other")
        y_other = layer(x)
    assert layer.active_adapters == ["other"] and layer.model.active_adapters.children == ["other"]
    other = layer.adapter_parameters("other")
    with torch.no_grad():
        delta = (x @ other["lora_A.weight"].T @ other["lora_B.weight"].T) * 2.0
    torch.testing.assert_close(y_other - y_default,
                               delta - (x @ layer.get_delta_weight("default").T), rtol=1e-4, atol=1e-5)
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"] and "other" not in layer.model.adapters_config.adapters


@needs_adapters
def test_a_list_of_names_is_the_librarys_stack_not_a_sum() -> None:
    from adapters.composition import Stack

    _, layer = _layer()
    layer.add_adapter("other", r=4, lora_alpha=16.0, init_lora_weights=False)
    layer.set_adapter(["default", "other"])
    assert isinstance(layer.model.active_adapters, Stack) and layer.active_adapters == ["default", "other"]
    assert "Stack" in _impl().unsupported["additive_adapters"]


# -- part 5 ---------------------------------------------------------------------------------------
@needs_adapters
def test_finding_4bit_merge_leaves_a_dense_unquantized_weight() -> None:
    base, layer = _layer()
    packed = tuple(base.weight.shape)
    layer.merge()
    w = layer.base_layer.weight
    # adapters 1.3.0 LoRALinear4bit.merge_adapter: Params4bit(..., **weight.__dict__) copies bnb_quantized=True
    assert layer.merged_adapters == ["default"] and w.dtype == torch.float32 and tuple(w.shape) == (48, 64) != packed
    with pytest.raises(RuntimeError):
        layer.unmerge()  # reset_adapter dequantizes the dense tensor as packed bytes


@needs_adapters
def test_finding_8bit_merge_calls_a_removed_bitsandbytes_api() -> None:
    _, layer = _layer(8)
    with pytest.raises(AttributeError, match="double_quant"):
        layer.merge()
    assert not layer.merged


@needs_adapters
def test_finding_dora_on_bnb_is_declared_missing_with_the_librarys_error() -> None:
    assert "linalg.vector_norm" in _impl().unsupported["dora"] and "dora" not in declared(_impl()).methods


@needs_adapters
def test_finding_delete_of_the_merged_adapter_raises_key_error_half_way() -> None:
    _, layer = _layer()
    layer.merge()
    with pytest.raises(KeyError, match="default"):
        layer.delete_adapter("default")
    assert layer.adapter_names == [] and layer.layer.merged == "default"  # left merged with a LoRA it lost


# -- the model entry ------------------------------------------------------------------------------
@needs_adapters
def test_model_entry_attaches_through_adapters_init_on_the_tiny_llama() -> None:
    from adapters.methods.lora import LoRALinear4bit

    from conformance.clauses.model import cases as mcases

    entry = _impl().model
    model = mcases.load(mcases.LOAD_PATHS[0], 4, 0, "cpu")
    want = mcases.targeted(model)
    adapted = entry.attach(model, mcases.TARGETS, AdapterSpec("lora", "default", dict(PARAMS)))
    layers = entry.adapter_layers(adapted)
    assert adapted is model and sorted(layers) == want
    for name, layer in layers.items():
        assert type(layer.base_layer) is LoRALinear4bit and layer.base_layer is model.get_submodule(name)
        assert torch.count_nonzero(layer.adapter_parameters("default")["lora_B.weight"]) > 0
    assert all(p.requires_grad == (".loras." in n) for n, p in model.named_parameters())


@needs_adapters
def test_model_entry_refuses_targets_adapters_cannot_name() -> None:
    from conformance.clauses.model import cases as mcases

    model = mcases.load(mcases.LOAD_PATHS[0], 4, 0, "cpu")
    with pytest.raises(ImplementationUnsupported, match="o_proj"):
        _impl().model.attach(model, ["q_proj", "o_proj"], AdapterSpec("lora", "default", dict(PARAMS)))


@needs_adapters
@pytest.mark.parametrize("clause,outcome", [
    ("LAYER-PROTOCOL-SURFACE", "passed"),
    ("FWD-ERR-RANK", "failed"),  # finding: r=0 ZeroDivisionError, r<0 a torch error, no ValueError
])
def test_clauses_report_adapters(clause: str, outcome: str) -> None:
    from conformance.clauses.clause import get
    from conformance.harness.execute import run_clause

    res = run_clause(get(clause), _impl())
    assert res.outcome == outcome, res.message
