"""The ``litgpt`` implementation under test (``conformance.impls.litgpt``): LitGPT's own ``LoRALinear``.

Part 1 runs everywhere: without litgpt, loading ``--impl litgpt`` is refused with the install line.
The rest needs litgpt (it lives in a venv of its own: LitGPT caps huggingface-hub below what
transformers needs) and is skipped with that reason elsewhere:

- Part 2, the wrapper: the layer *is* LitGPT's ``LoRALinear`` with the bnb base as its ``linear``;
  names are translated, values are LitGPT's own Parameters; the capabilities are exactly LitGPT's.
- Part 3, no gaps filled: what LitGPT lacks raises ``ImplementationUnsupported`` with the reason.
- Part 4, numbers: the forward is LitGPT's expression, matched against the float64 value.
- Part 5, findings: the clauses that carry the LitGPT findings of docs/findings.md report them.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys

import pytest
import torch

from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported, declared
from conformance.harness.loader import load
from conformance.quant.layers import dequantize, make_base_layer

HAS_LITGPT = importlib.util.find_spec("litgpt") is not None
needs_litgpt = pytest.mark.skipif(not HAS_LITGPT, reason="litgpt is not installed (its own venv: see "
                                  "conformance/impls/litgpt.py INSTALL)")
PARAMS = {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}


# -- part 1 ---------------------------------------------------------------------------------------
def test_unimportable_litgpt_is_refused_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litgpt.lora", None)  # import litgpt.lora raises ImportError
    with pytest.raises(ImplementationUnsupported, match=r"pip install --no-deps litgpt==0\.5\.13"):
        load("litgpt")


# -- helpers ----------------------------------------------------------------------------------------
def _impl():
    return load("litgpt")


def _layer(bits: int = 4, **params):
    base = make_base_layer(64, 48, bits=bits)
    torch.manual_seed(0)
    return base, _impl().create(base, AdapterSpec("lora", "default", params or dict(PARAMS)))


# -- part 2 ---------------------------------------------------------------------------------------
@needs_litgpt
def test_capabilities_are_exactly_litgpts() -> None:
    impl = _impl()
    assert impl.capabilities == frozenset({"4bit", "8bit", "cuda", "dropout", "merge"})
    for gap in ("oft", "multi_adapter", "additive_adapters", "multi_merge", "active_trainable", "mixed_batch",
                "lora_bias", "disable_adapters", "delete_adapter", "model", "prepare", "unmerge", "safe_merge",
                "rslora", "input_cast"):
        assert gap not in impl.capabilities
        assert impl.unsupported[gap].startswith(f"litgpt {impl.version()}: "), gap
    assert declared(impl).methods == frozenset({"lora"}) and declared(impl).bits == frozenset({4, 8})


@needs_litgpt
@pytest.mark.parametrize("bits", [4, 8])
def test_layer_is_litgpts_lora_linear_over_the_given_base(bits: int) -> None:
    from litgpt.lora import LoRALinear

    base, layer = _layer(bits)
    assert type(layer.layer) is LoRALinear
    assert layer.base_layer is base and layer.layer.linear is base
    params = layer.adapter_parameters("default")
    assert params["lora_A.weight"] is layer.layer.lora_A and params["lora_B.weight"] is layer.layer.lora_B
    assert params["lora_A.weight"].shape == (4, 64) and params["lora_B.weight"].shape == (48, 4)
    assert layer.layer.scaling == 16.0 / 4
    torch.testing.assert_close(layer.get_delta_weight("default"), layer.layer.lora_B @ layer.layer.lora_A * 4.0,
                               rtol=0, atol=0)
    assert not layer.merged and layer.merged_adapters == [] and layer.active_adapters == ["default"]
    assert torch.count_nonzero(params["lora_B.weight"]) > 0  # init_lora_weights=False: a non-zero B


@needs_litgpt
def test_adapter_dtype_and_device_as_under_fabric_and_default_dtype_restored() -> None:
    from conformance.impls.litgpt import LitgptApi

    base = make_base_layer(64, 48, bits=4, compute_dtype=torch.bfloat16)
    layer = LitgptApi().build(base, AdapterSpec("lora", "default", dict(PARAMS)), dtype=torch.bfloat16)
    assert layer.layer.lora_A.dtype == layer.layer.lora_B.dtype == torch.bfloat16
    assert layer.layer.lora_A.device == base.weight.device
    assert torch.get_default_dtype() == torch.float32


@needs_litgpt
def test_default_init_is_the_base_output_bit_for_bit() -> None:
    base = make_base_layer(64, 48, bits=4)
    layer = _impl().create(base, AdapterSpec("lora", "default", {"r": 4}))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


@needs_litgpt
def test_deepcopy_keeps_litgpts_tensors() -> None:
    _, layer = _layer()
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.layer.lora_B, layer.layer.lora_B) and twin.layer.lora_B is not layer.layer.lora_B


# -- part 3 ---------------------------------------------------------------------------------------
@needs_litgpt
@pytest.mark.parametrize("call", [
    lambda layer: layer.unmerge(),
    lambda layer: layer.merge(safe_merge=True),
    lambda layer: layer.merge(adapter_names=["other"]),
    lambda layer: layer.add_adapter("other", r=4),
    lambda layer: layer.set_adapter("other"),
    lambda layer: layer.adapter_parameters("other"),
], ids=["unmerge", "safe_merge", "merge-other", "add_adapter", "set_adapter-other", "parameters-other"])
def test_what_litgpt_lacks_is_refused(call) -> None:
    _, layer = _layer()
    with pytest.raises(ImplementationUnsupported, match="litgpt 0.5.13"):
        call(layer)
    assert not layer.merged


@needs_litgpt
@pytest.mark.parametrize("method,params,match", [
    ("lora", {"r": 4, "use_rslora": True}, "use_rslora"),
    ("lora", {"r": 4, "lora_bias": True}, "bias"),
    ("lora", {"r": 4, "clone_base_output": False}, "in place"),
    ("oft", {"r": 4}, "no OFT"),
])
def test_options_litgpt_lacks_are_refused(method: str, params: dict, match: str) -> None:
    with pytest.raises(ImplementationUnsupported, match=match):
        _impl().create(make_base_layer(64, 48), AdapterSpec(method, "default", params))


@needs_litgpt
def test_unknown_parameter_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="lora_rank"):
        _impl().create(make_base_layer(64, 48), AdapterSpec("lora", "default", {"lora_rank": 4}))


@needs_litgpt
def test_mixed_batch_goes_to_litgpt_which_takes_no_adapter_names() -> None:
    _, layer = _layer()
    with pytest.raises(TypeError, match="adapter_names"):
        layer(torch.randn(2, 64), adapter_names=["default", "__base__"])


# -- part 4 ---------------------------------------------------------------------------------------
@needs_litgpt
@pytest.mark.parametrize("bits", [4, 8])
def test_forward_matches_float64(bits: int) -> None:
    base, layer = _layer(bits)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    a, b = layer.layer.lora_A.double(), layer.layer.lora_B.double()
    with torch.no_grad():
        y = layer(x)
        w = dequantize(base).double()
    bias = base.bias.double()
    if bits == 4:
        expected = x.double() @ w.T + bias + (x.double() @ a.T @ b.T) * 4.0
        tol = 1e-5  # fp32 compute on the dequantized weight
    else:
        # LLM.int8 (threshold 0) quantizes x row-wise as well: compare with the base's own output
        with torch.no_grad():
            expected = base(x).double() + (x.double() @ a.T @ b.T) * 4.0
        tol = 1e-5
    assert (y.double() - expected).abs().max().item() < tol * max(1.0, expected.abs().max().item())


@needs_litgpt
def test_dropout_is_litgpts_own() -> None:
    base, layer = _layer(r=4, lora_alpha=16.0, init_lora_weights=False, lora_dropout=0.5)
    assert isinstance(layer.layer.lora_dropout, torch.nn.Dropout) and layer.layer.lora_dropout.p == 0.5
    x = torch.randn(8, 64)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        assert torch.equal(layer(x), y_eval)
        layer.train()
        torch.manual_seed(1)
        assert not torch.equal(layer(x), y_eval)


@needs_litgpt
def test_gradients_reach_litgpts_lora_parameters_only() -> None:
    base, layer = _layer()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.layer.lora_A.grad is not None and layer.layer.lora_B.grad is not None
    assert math.isfinite(layer.layer.lora_A.grad.abs().sum().item())
    assert base.weight.grad is None and x.grad is not None


# -- part 5 ---------------------------------------------------------------------------------------
@needs_litgpt
@pytest.mark.parametrize("clause,outcome", [
    ("LAYER-PROTOCOL-SURFACE", "passed"),
    ("FWD-ERR-SHAPE", "passed"),
    ("FWD-ERR-RANK", "failed"),  # finding: r=0 accepted, r<0 a bare AssertionError
    ("MERGE-WARNS-LORA", "failed"),  # finding: a merge into 4/8-bit emits no rounding warning
])
def test_clauses_report_litgpt(clause: str, outcome: str) -> None:
    from conformance.clauses.clause import get
    from conformance.harness.execute import run_clause

    res = run_clause(get(clause), _impl())
    assert res.outcome == outcome, res.message


@needs_litgpt
def test_the_8bit_cases_litgpt_can_take_run_and_the_fp16_inputs_are_skipped_alone() -> None:
    from conformance.clauses.clause import get
    from conformance.harness.execute import run_clause

    res = run_clause(get("FWD-INIT-IDENTITY"), _impl())
    fam = res.families["lora/8bit"]  # LitGPT declares no input_cast: fp16 inputs to fp32 adapters are left out
    assert res.outcome == "passed", res.message
    assert fam.run > 0 and fam.skip_reasons == {"input_cast not declared": fam.skipped} and fam.skipped


@needs_litgpt
def test_an_exception_out_of_litgpts_8bit_merge_is_its_failure() -> None:
    from conformance.clauses.clause import get
    from conformance.harness.execute import run_clause

    res = run_clause(get("MERGE-WARNS-LORA"), _impl())
    fam = res.families["lora/8bit"]  # finding 2: a merge into an int8-stored base raises
    assert fam.outcome == "failed", fam
    assert "RuntimeError" in fam.message and "raised in the implementation at litgpt/lora.py:" in fam.message


@needs_litgpt
def test_finding_4bit_merge_leaves_a_dense_unquantized_weight() -> None:
    base, layer = _layer()
    packed = tuple(base.weight.shape)
    layer.merge()
    w = layer.base_layer.weight
    # LitGPT 0.5.13 (bnb 0.50.2): Params4bit(..., **weight.__dict__) copies bnb_quantized=True, so no requantization
    assert layer.merged and w.dtype == torch.float32 and tuple(w.shape) == (48, 64) != packed
