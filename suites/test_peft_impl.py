"""The ``peft`` implementation under test: same numbers as the reference, and the known differences.

Part 1 (equivalence): the reference layer and PEFT's layer, over deep copies of one quantized base
and with PEFT's adapter tensors overwritten by the reference's (through ``adapter_parameters``),
give the same forward output and the same gradients within a bound derived from the unit
roundoff (``conformance.quant.bounds``): both evaluate the same real-valued expression, so each is
within Higham's product-chain bound ``gamma_N(u) * |magnitude|`` of the exact value, and the two
differ by at most twice that. For OFT the Cayley solve adds a conditioning factor (below).

Part 2 (the wrapper): version detection by feature, clear errors for what a PEFT version lacks.

Part 3 (differences): where PEFT does something else than the reference, the test asserts that
the difference is there (so the suite documents it, and notices when a PEFT release changes it).
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import peft  # noqa: E402
from packaging.version import Version  # noqa: E402

from conformance.clauses.cases import BaseCase, base_cases  # noqa: E402
from conformance.clauses.interface import AdapterSpec, ImplementationUnsupported
from conformance.core.vocabulary import Capability, Method
from conformance.harness.loader import load
from conformance.impls import peft as peft_impl  # noqa: E402
from conformance.impls.peft import PeftImplementation  # noqa: E402
from conformance.impls.reference import ReferenceImplementation  # noqa: E402
from conformance.quant.bounds import gamma, matmul_rounding_bound, output_bound, unit_roundoff, weight_bound
from conformance.quant.layers import dequantize, make_base_layer  # noqa: E402
from conformance.reference import rotation  # noqa: E402

PEFT_VERSION = Version(peft.__version__)
IMPL = PeftImplementation()
REF = ReferenceImplementation()
U = unit_roundoff(torch.float32)

LORA_CASES = [
    {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False},
    {"r": 8, "lora_alpha": 8.0, "init_lora_weights": False, "use_rslora": True},
    {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False, "lora_bias": True},
]
OFT_CASES = [
    {"r": 4, "init_weights": False},
    {"r": 0, "oft_block_size": 8, "init_weights": False, "block_share": True},
    {"r": 4, "init_weights": False, "coft": True, "eps": 1e-2},
]
BASES = [c for c in base_cases(4) if c.in_features == 64] + base_cases(8)


def _needs(*caps: str) -> None:
    missing = [c for c in caps if c not in IMPL.capabilities and c not in IMPL.methods]
    if missing:
        pytest.skip(f"peft {peft.__version__} lacks {missing}: {[IMPL.unsupported.get(c, '') for c in missing]}")


def _pair(case: BaseCase, method: str, params: dict[str, Any], seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(reference layer, PEFT layer, untouched base copy) with PEFT's adapter tensors = the reference's."""
    base = case.build(seed=seed)
    torch.manual_seed(seed)
    ref = REF.create(copy.deepcopy(base), AdapterSpec(method, "default", params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl = IMPL.create(copy.deepcopy(base), AdapterSpec(method, "default", params))
    _copy_adapter(ref, pl, "default")
    return ref, pl, base


def _copy_adapter(src: nn.Module, dst: nn.Module, name: str) -> None:
    theirs = dst.adapter_parameters(name)
    mine = src.adapter_parameters(name)
    assert set(mine) == set(theirs), f"adapter_parameters keys differ: reference {sorted(mine)}, peft {sorted(theirs)}"
    with torch.no_grad():
        for key, value in mine.items():
            theirs[key].copy_(value)


def _abs(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().abs()


def _run(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.clone().requires_grad_(True)
    y = layer(xi, **kw)
    (y.float() * w).sum().backward()
    return y.detach(), xi.grad


def _report(what: str, diff: torch.Tensor, bound: torch.Tensor) -> str:
    ratio = (diff.double() / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    return f"{what}: max |reference - peft| = {diff.max().item():.3g}, worst diff/bound = {ratio:.3g}"


def _assert_within(what: str, a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor) -> None:
    diff = (a.double() - b.double()).abs()
    assert bool((diff <= bound).all()), _report(what, diff, bound)


# -- bounds -------------------------------------------------------------------------------------
def lora_bounds(ref: nn.Module, base: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bounds on |reference - peft| for LoRA's output and gradients (loss = sum(y * w), so dL/dy = w).

    ``base(x)`` is the same bitsandbytes call on identical bytes and input in both, so the two
    differ only in the adapter branch ``s * (B (A x) + b)`` and the final add. Each evaluation of
    a product chain with inner dimensions summing to N is within ``gamma_N(u)`` times the chain on
    absolute values of the exact value (Higham, Accuracy and Stability, 3.5); the final add rounds
    once more (``u |y|``); two evaluations differ by at most twice that.
    """
    p = ref.adapter_parameters("default")
    a, b = _abs(p["lora_A.weight"]), _abs(p["lora_B.weight"])
    bias = _abs(p["lora_B.bias"]) if "lora_B.bias" in p else torch.zeros(b.shape[0], dtype=torch.float64)
    s = abs(ref.scaling["default"])
    n_in, r = a.shape[1], a.shape[0]
    batch = x.shape[0]
    xa, wa = _abs(x), _abs(w)
    w_base = _abs(dequantize(base))
    branch = s * ((xa @ a.t()) @ b.t() + bias)
    y_mag = xa @ w_base.t() + branch
    return {
        "y": 2 * (gamma(n_in + r + 2, U) * branch + U * y_mag),
        "lora_A.weight": 2 * gamma(b.shape[0] + batch + 2, U) * s * (b.t() @ wa.t()) @ xa,
        "lora_B.weight": 2 * gamma(n_in + batch + 2, U) * s * wa.t() @ (xa @ a.t()),
        "lora_B.bias": 2 * gamma(batch + 1, U) * s * wa.sum(0),
        "x": 2 * gamma(b.shape[0] + r + 2, U) * (wa @ w_base + s * (wa @ b) @ a),
    }


def _blocks(layer: nn.Module, n_blocks: int, size: int) -> torch.Tensor:
    """The (n_blocks, b, b) rotation blocks an implementation computes (its ``get_delta_weight``)."""
    full = layer.get_delta_weight("default").detach().double()
    return torch.stack([full[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(n_blocks)])


def _cayley_residual(layer: nn.Module, n_blocks: int, size: int) -> float:
    """A-posteriori bound on max_k |R_k - cayley(Q_k)|_2 for the layer's own computed rotation.

    ``R - R_exact = (I + Q)^-1 ((I + Q) R - (I - Q))`` and ``sigma_min(I + Q) >= 1`` for Q
    skew-symmetric, so the 2-norm error is at most the residual's 2-norm (evaluated in float64,
    exactly enough: its own rounding is below 2^-53 relative).
    """
    vec = layer.adapter_parameters("default")["oft_R.weight"].detach().double()
    q = rotation.skew(vec, size)
    if q.shape[0] == 1 and n_blocks > 1:
        q = q.expand(n_blocks, -1, -1)
    eye = torch.eye(size, dtype=torch.float64).expand_as(q)
    res = (eye + q) @ _blocks(layer, n_blocks, size) - (eye - q)
    return float(torch.linalg.matrix_norm(res, ord=2).max())


def coft_param_bound(ref: nn.Module) -> torch.Tensor:
    """Under COFT both layers project Q in place (PEFT ``_project_batch``, reference
    ``rotation.coft_project``); the two differ by roundings of the Frobenius norm and the scale:
    ``|dQ| <= (2 gamma_{b^2}(u) + 6u) |Q|`` elementwise. Without COFT the parameters stay equal."""
    cfg = ref.configs["default"]
    vec = _abs(ref.adapter_parameters("default")["oft_R.weight"])
    if not cfg.coft:
        return torch.zeros_like(vec)
    _, size = ref.layout("default")
    return (2 * gamma(size * size, U) + 6 * U) * vec


def oft_bounds(ref: nn.Module, pl: nn.Module, base: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bounds on |reference - peft| for OFT (exact Cayley): y = base(x R), R = blockdiag(cayley(Q_k)).

    Rotation: each layer's own R is within its Cayley residual of the exact rotation of its own Q
    (``_cayley_residual``), and the two Q differ by at most ``coft_param_bound`` (``|dR|_2 <=
    2 |dQ|_2``: dR = -(I+Q)^-1 dQ (I+R)). The rotated inputs then differ by that times the block's
    input mass plus the einsum's rounding (gamma_b on both), and the (linear) base maps the
    difference through ``|W|`` plus its own float32 rounding on both sides (``matmul_rounding_bound``).
    Gradients: ``dL/dQ_k = -(I+Q)^-T (x_k^T G_k) (I+R)^T`` with ``G = dL/dy W`` has Frobenius norm
    at most ``2 |x_k^T G_k|``, the skew gather doubles it; the chain has N = batch + out + 6b + 4 terms.
    """
    cfg = ref.configs["default"]
    n_blocks, size = ref.layout("default")
    dq = float(torch.linalg.matrix_norm(rotation.skew(coft_param_bound(ref), size), ord="fro").max())
    rot_err = _cayley_residual(ref, n_blocks, size) + _cayley_residual(pl, n_blocks, size) + 2 * dq
    r_full = rotation.block_diagonal(_blocks(ref, n_blocks, size), n_blocks).abs()
    ones = torch.block_diag(*[torch.ones(size, size, dtype=torch.float64)] * n_blocks)
    xa, wa = _abs(x), _abs(w)
    w_base = _abs(dequantize(base))
    xr = xa @ r_full
    dxr = rot_err * (xa @ ones) + 2 * gamma(size, U) * xr
    y = dxr @ w_base.t() + 2 * matmul_rounding_bound(xr, w_base, torch.float32)
    g = wa @ w_base  # |dL/dxr| magnitude, batch x in
    per_block = torch.tensor([
        4 * float(torch.linalg.matrix_norm(xa[:, k * size:(k + 1) * size].t() @ g[:, k * size:(k + 1) * size]))
        for k in range(n_blocks)
    ], dtype=torch.float64)
    q_vec = ref.adapter_parameters("default")["oft_R.weight"]
    rel = 2 * gamma(x.shape[0] + w_base.shape[0] + 6 * size + 4, U) + 2 * dq + 2 * rot_err
    if cfg.block_share:
        grad_q = torch.full(q_vec.shape, rel * float(per_block.sum()), dtype=torch.float64)
    else:
        grad_q = (per_block * rel)[:, None].expand(q_vec.shape)
    dx = rot_err * (g @ ones) + 2 * gamma(w_base.shape[0] + size + 2, U) * (g @ r_full.t())
    return {"y": y, "oft_R.weight": grad_q, "x": dx}


def _bounds(method: str, ref: nn.Module, pl: nn.Module, base: nn.Module, x: torch.Tensor,
            w: torch.Tensor) -> dict[str, torch.Tensor]:
    return lora_bounds(ref, base, x, w) if method == "lora" else oft_bounds(ref, pl, base, x, w)


# -- part 1: equivalence ------------------------------------------------------------------------
def _equivalence(case: BaseCase, method: str, params: dict[str, Any]) -> None:
    _needs(method, f"{case.bits}bit")
    ref, pl, base = _pair(case, method, params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, case.in_features, generator=gen)
    w = torch.randn(5, case.out_features, generator=gen)
    y_ref, gx_ref = _run(ref, x, w)
    y_peft, gx_peft = _run(pl, x, w)
    label = f"{method} {params} on {case.label}"
    if method == "oft":  # COFT projects the parameters in place during forward: they must still agree
        _assert_within(f"{label}: projected oft_R.weight", ref.adapter_parameters("default")["oft_R.weight"],
                       pl.adapter_parameters("default")["oft_R.weight"], coft_param_bound(ref))
    bounds = _bounds(method, ref, pl, base, x, w)
    _assert_within(f"{label}: output", y_ref, y_peft, bounds["y"])
    _assert_within(f"{label}: input gradient", gx_ref, gx_peft, bounds["x"])
    mine, theirs = ref.adapter_parameters("default"), pl.adapter_parameters("default")
    for key, p in mine.items():
        assert p.grad is not None and theirs[key].grad is not None, f"{label}: no gradient for {key}"
        _assert_within(f"{label}: gradient of {key}", p.grad, theirs[key].grad, bounds[key])


@pytest.mark.parametrize("params", LORA_CASES, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("case", BASES, ids=lambda c: c.label)
def test_lora_matches_reference(case: BaseCase, params: dict[str, Any]) -> None:
    if params.get("lora_bias"):
        _needs("lora_bias")
    _equivalence(case, "lora", params)


@pytest.mark.parametrize("params", OFT_CASES, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("case", BASES, ids=lambda c: c.label)
def test_oft_matches_reference(case: BaseCase, params: dict[str, Any]) -> None:
    _equivalence(case, "oft", params)


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_bounds_detect_a_perturbed_adapter(method: str) -> None:
    """The bounds are tight enough to matter: a relative 1e-3 change of one adapter tensor is seen."""
    _needs(method, "4bit")
    params = LORA_CASES[0] if method == "lora" else OFT_CASES[0]
    ref, pl, base = _pair(BaseCase(4), method, params)
    key = "lora_B.weight" if method == "lora" else "oft_R.weight"
    with torch.no_grad():
        pl.adapter_parameters("default")[key].mul_(1 + 1e-3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))
    bounds = _bounds(method, ref, pl, base, x, w)
    diff = (_run(ref, x, w)[0].double() - _run(pl, x, w)[0].double()).abs()
    assert bool((diff > bounds["y"]).any()), _report("perturbed adapter", diff, bounds["y"])


def test_lora_multi_adapter_and_mixed_batch_match_reference() -> None:
    """add_adapter / set_adapter([...]) / forward(adapter_names=...) translate to PEFT's API."""
    _needs("lora", "multi_adapter", "mixed_batch")
    case = BaseCase(4)
    ref, pl, base = _pair(case, "lora", LORA_CASES[0])
    other = {"r": 2, "lora_alpha": 4.0, "init_lora_weights": False}
    ref.add_adapter("other", **other)
    pl.add_adapter("other", **other)
    _copy_adapter(ref, pl, "other")
    ref.set_adapter(["default", "other"])
    pl.set_adapter(["default", "other"])
    assert pl.active_adapters == ["default", "other"]
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, 48)
    b1 = lora_bounds(ref, base, x, w)["y"]
    # the second adapter adds one more branch of the same size: bound it the same way
    y_ref, y_peft = ref(x), pl(x)
    delta = y_ref - ref.base_layer(x)
    bound = 2 * b1 + 4 * U * _abs(delta)
    _assert_within("two active adapters", y_ref, y_peft, bound)
    names = ["default", "__base__", "other", "default"]
    _assert_within("mixed batch", ref(x, adapter_names=names), pl(x, adapter_names=names), bound)


def test_wrapper_passes_calls_through() -> None:
    """adapter_parameters are PEFT's own Parameters; base_layer is PEFT's current base layer."""
    _needs("lora", "4bit", "disable_adapters", "delete_adapter")
    _, pl, _ = _pair(BaseCase(4), "lora", LORA_CASES[0])
    assert pl.adapter_parameters("default")["lora_A.weight"] is pl.layer.lora_A["default"].weight
    assert pl.base_layer is pl.layer.get_base_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.merge()
        assert pl.merged and pl.merged_adapters == ["default"]
        assert pl.base_layer is pl.layer.get_base_layer()
        pl.unmerge()
    assert not pl.merged
    pl.eval()
    assert not pl.layer.training and not pl.layer.lora_dropout["default"].training
    pl.train()
    assert pl.layer.training
    pl.enable_adapters(False)
    assert pl.disable_adapters
    pl.enable_adapters(True)
    pl.add_adapter("extra", r=2)
    pl.delete_adapter("extra")
    assert pl.adapter_names == ["default"]


# -- part 2: the wrapper, version detection, unsupported features ----------------------------------
def test_load_by_name_and_version() -> None:
    impl = load("peft")
    assert isinstance(impl, PeftImplementation)
    assert impl.version() == peft.__version__
    assert all(isinstance(c, Capability) for c in impl.capabilities)
    assert all(isinstance(m, Method) for m in impl.methods)
    for cap, reason in impl.unsupported.items():
        assert cap not in impl.capabilities and cap not in impl.methods and reason, f"unsupported {cap!r} needs a reason"


def test_feature_detection_agrees_with_release_history() -> None:
    """Detection is by feature; cross-check it against what each release is known to have."""
    api = IMPL._api
    lora_cls = peft.tuners.lora.bnb.Linear4bit
    assert api.lora_config_api == ("config" in inspect.signature(lora_cls.__init__).parameters)
    assert api.lora_config_api == (PEFT_VERSION >= Version("0.19.0"))
    if PEFT_VERSION >= Version("0.21.0"):
        assert api.oft_style == "backend" and "oft" in IMPL.methods
    elif PEFT_VERSION >= Version("0.16.0"):
        assert api.oft_style == "bnb" and "oft" in IMPL.methods
    else:
        assert api.oft_style == "" and "oft" not in IMPL.methods
        assert "oft" in IMPL.unsupported


def test_unsupported_oft_fails_clearly() -> None:
    if "oft" in IMPL.methods:
        pytest.skip(f"peft {peft.__version__} supports OFT on bitsandbytes")
    with pytest.raises(ImplementationUnsupported, match="no OFT|OFTRotationModule"):
        IMPL.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {"r": 4}))


def test_missing_features_drop_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any bnb OFT (as in PEFT <= 0.15) 'oft' is dropped with a reason, and create says why."""
    real = peft_impl._import

    def fake(name: str) -> Any:
        return None if name in ("peft.tuners.oft.bnb", "peft.utils.quantization_utils") else real(name)

    monkeypatch.setattr(peft_impl, "_import", fake)
    impl = PeftImplementation()
    assert "oft" not in impl.methods and "OFT" in impl.unsupported["oft"]
    assert "lora" in impl.methods
    with pytest.raises(ImplementationUnsupported, match="OFT"):
        impl.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {"r": 4}))


def test_peft_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft_impl, "_import", lambda name: None)
    with pytest.raises(ImplementationUnsupported, match="peft is not installed"):
        PeftImplementation()


def test_clone_base_output_false_is_unsupported() -> None:
    _needs("lora")
    assert "clone_base_output=False" in IMPL.unsupported
    with pytest.raises(ImplementationUnsupported, match="always clones"):
        IMPL.create(make_base_layer(64, 48), AdapterSpec("lora", "default", {"r": 4, "clone_base_output": False}))
    # True is what PEFT does: accepted
    IMPL.create(make_base_layer(64, 48), AdapterSpec("lora", "default", {"r": 4, "clone_base_output": True}))


def test_unknown_parameter_is_a_clear_error() -> None:
    _needs("lora")
    with pytest.raises(TypeError, match="lora_alpha"):
        IMPL.create(make_base_layer(64, 48), AdapterSpec("lora", "default", {"r": 4, "alpha": 8}))


def test_protocol_defaults_not_peft_config_defaults() -> None:
    """Unset parameters take the protocol's defaults: PEFT's OFTConfig would use block size 32 + Neumann."""
    _needs("oft")
    layer = IMPL.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {}))
    assert layer.adapter_parameters("default")["oft_R.weight"].shape == (8, rotation.n_elements(8))
    assert layer.layer.oft_R["default"].use_cayley_neumann is False


# -- part 3: documented differences between PEFT and the reference --------------------------------
def test_difference_neumann_approximates_transpose() -> None:
    """PEFT's Neumann series ``I + 2Q + 2Q^2 + ... + Q^(n-1)`` expands ``(I+Q)(I-Q)^-1 = R^T``, the
    transpose (inverse) of its own exact Cayley rotation ``R = (I+Q)^-1 (I-Q)``
    (peft/tuners/oft/layer.py ``_cayley_batch``, every release with ``OFTRotationModule``: 0.16+).
    The reference's series expands ``R`` (clause OFT-NEUMANN-CONVERGES)."""
    _needs("oft", "4bit")
    terms = 5
    layer = IMPL.create(make_base_layer(64, 48), AdapterSpec(
        "oft", "default", {"r": 4, "init_weights": False, "use_cayley_neumann": True, "num_cayley_neumann_terms": terms}))
    p = layer.adapter_parameters("default")["oft_R.weight"]
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    q = rotation.skew(p.detach().double(), 16)
    exact = rotation.cayley(q)
    qn = float(torch.linalg.matrix_norm(q, ord=2).max())
    assert qn < 0.5
    # truncation: R^T - series = -Q^(n-1) - 2 sum_{k>=n} Q^k; rounding: n products of b-term sums
    bound = qn ** (terms - 1) + 2 * qn**terms / (1 - qn) + gamma(terms * 16, U) * (1 + 2 / (1 - qn))
    got = layer.get_delta_weight("default").detach().double()
    to_transpose = (got - rotation.block_diagonal(exact.transpose(-2, -1), 4)).abs().max().item()
    to_rotation = (got - rotation.block_diagonal(exact, 4)).abs().max().item()
    assert to_transpose <= bound, (
        f"peft {peft.__version__}: Neumann R is {to_transpose:.3g} from exact R^T (bound {bound:.3g}): "
        "the documented difference is gone; update this test and the report")
    assert to_rotation > 10 * bound, f"peft {peft.__version__}: Neumann R is close to R itself ({to_rotation:.3g})"


@pytest.mark.parametrize("bits", [4, 8])
def test_difference_lora_bias_merged_unscaled(bits: int) -> None:
    """PEFT's bnb LoRA merge adds ``lora_B.bias`` to the base bias unscaled (peft/tuners/lora/bnb.py,
    ``bias_data = bias + lora_B.bias``) while its forward scales it (``lora_B(...) * scaling``); the
    reference merges ``scaling * b`` like PEFT's unquantized Linear, so merge keeps the output."""
    _needs("lora", "lora_bias", f"{bits}bit")
    case = BaseCase(bits)
    ref, pl, _ = _pair(case, "lora", LORA_CASES[2])
    s = ref.scaling["default"]
    assert s != 1
    b_lora = pl.adapter_parameters("default")["lora_B.bias"].detach().double()
    before = pl.base_layer.bias.detach().double().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.merge()
    added = pl.base_layer.bias.detach().double() - before
    ub = unit_roundoff(pl.base_layer.bias.dtype)
    tol = 2 * ub * (before.abs() + b_lora.abs() * max(1, s))
    assert bool(((added - b_lora).abs() <= tol).all()), f"peft {peft.__version__}: merged bias is not bias + b_B"
    assert bool(((added - s * b_lora).abs() > tol).any()), f"peft {peft.__version__} now scales the merged bias"


@pytest.mark.parametrize("bits", [4, 8])
def test_difference_safe_merge_with_lora_bias_crashes(bits: int) -> None:
    """PEFT's bnb LoRA ``merge(safe_merge=True)`` with ``lora_bias=True`` tests ``not torch.isfinite(bias)``
    on a whole vector (peft/tuners/lora/bnb.py, no ``.all()``), so even a finite adapter raises
    "Boolean value of Tensor with more than one value is ambiguous" (0.15.2 and 0.21.2)."""
    _needs("lora", "lora_bias", f"{bits}bit")
    _, pl, _ = _pair(BaseCase(bits), "lora", LORA_CASES[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="ambiguous"):
            pl.merge(safe_merge=True)


def test_difference_oft_multi_merge_order() -> None:
    """With two active OFT adapters PEFT's forward rotates ``x R1 R2`` but merging writes
    ``W R1^T`` then ``(W R1^T) R2^T``, i.e. the merged layer computes ``x R2 R1 W^T``: the merged
    output follows the reversed product (peft/tuners/oft/layer.py ``merge``; rotations do not
    commute). 8-bit, whose requantization error is small enough to tell the two orders apart."""
    _needs("oft", "8bit", "multi_adapter")
    layer = IMPL.create(make_base_layer(64, 48, bits=8), AdapterSpec("oft", "default", {"r": 4, "init_weights": False}))
    layer.add_adapter("second", r=4, init_weights=False)
    layer.set_adapter(["default", "second"])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).double()
    w0, bias = dequantize(layer.base_layer).double(), layer.base_layer.bias.double()
    r1, r2 = (layer.get_delta_weight(n).detach().double() for n in ("default", "second"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=["default"])
        wb1 = weight_bound(layer.base_layer)
        layer.merge(adapter_names=["second"])
    wb2 = weight_bound(layer.base_layer)
    y = layer(x.float()).double()
    # |W2 - W R1^T R2^T| <= wb2 + wb1 |R2|^T + float32 rounding of the two rotations of W
    rot = gamma(2 * 64, U) * (w0.abs() @ r1.abs().t() @ r2.abs().t())
    w_err = wb2 + wb1 @ r2.abs().t() + 2 * rot
    bound = output_bound(w_err, x) + matmul_rounding_bound(x, w0.abs(), torch.float32)
    reversed_order = x @ r2 @ r1 @ w0.t() + bias
    forward_order = x @ r1 @ r2 @ w0.t() + bias
    _assert_within(f"peft {peft.__version__}: merged output vs x R2 R1 W^T", y, reversed_order, bound)
    assert bool(((y - forward_order).abs() > bound).any()), (
        f"peft {peft.__version__}: the merged layer now follows the forward order x R1 R2 W^T; update this test")


def test_difference_oft_merge_warning() -> None:
    """PEFT 0.21's OFT on bnb (generic Linear + quantization backend) merges silently; 0.16-0.20's
    oft/bnb.py warned 'Merge oft module to 4-bit linear may get different generations ...' as the
    reference does."""
    _needs("oft", "4bit")
    layer = IMPL.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {"r": 4, "init_weights": False}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    texts = [str(c.message) for c in caught]
    warned = any("Merge oft module" in t for t in texts)
    if IMPL._api.oft_style == "backend":
        assert not warned, f"peft {peft.__version__} now warns on OFT merge: {texts}"
    else:
        assert warned, f"peft {peft.__version__}: no merge warning: {texts}"


def test_difference_invalid_oft_r_is_adjusted() -> None:
    """PEFT adjusts an r that does not divide in_features (with a warning) where the reference raises."""
    _needs("oft", "4bit")
    with pytest.raises(ValueError, match="does not divide"):
        REF.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {"r": 5}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = IMPL.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {"r": 5}))
    assert any("Adjusted `r`" in str(c.message) for c in caught)
    assert layer.adapter_parameters("default")["oft_R.weight"].shape[0] == 4


def test_difference_adapter_dtype_follows_compute_dtype() -> None:
    """Since PEFT 0.19 a new adapter is cast to the 4-bit base's ``compute_dtype`` (tuners_utils
    ``_get_base_layer_device_and_dtype``); the reference (and PEFT <= 0.18, which only looked at the
    uint8 packed weight) keep float32 adapters. (A whole ``PeftModel`` upcasts them again with
    ``autocast_adapter_dtype=True``; a bare layer does not.) Detected by feature, checked both ways."""
    _needs("lora", "4bit")
    from peft.tuners import tuners_utils

    casts = "compute_dtype" in inspect.getsource(tuners_utils)
    assert casts == (PEFT_VERSION >= Version("0.19.0"))
    base = make_base_layer(64, 48, compute_dtype=torch.bfloat16)
    pl = IMPL.create(copy.deepcopy(base), AdapterSpec("lora", "default", {"r": 4}))
    ref = REF.create(copy.deepcopy(base), AdapterSpec("lora", "default", {"r": 4}))
    expected = torch.bfloat16 if casts else torch.float32
    assert pl.adapter_parameters("default")["lora_A.weight"].dtype == expected
    assert ref.adapter_parameters("default")["lora_A.weight"].dtype == torch.float32


def test_difference_oft_has_no_mixed_batch() -> None:
    """PEFT's OFT layers take no ``adapter_names``: the keyword reaches the bnb layer (TypeError)."""
    _needs("oft", "4bit")
    layer = IMPL.create(make_base_layer(64, 48), AdapterSpec("oft", "default", {"r": 4}))
    assert "oft" in IMPL.limitations["mixed_batch"]
    with pytest.raises(TypeError, match="adapter_names"):
        layer(torch.randn(2, 64), adapter_names=["default", "__base__"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# -- DoRA -----------------------------------------------------------------------------------------
def test_dora_is_lora_with_use_dora_and_its_magnitude_is_peft_own() -> None:
    """``method='dora'`` builds PEFT's LoRA bnb layer with ``LoraConfig(use_dora=True)``; the canonical
    ``lora_magnitude_vector.weight`` is PEFT's own Parameter, and the output is the DoRA oracle's within its bound."""
    from conformance.numerics import dora as ndora

    _needs("dora", "4bit")
    impl = PeftImplementation()
    decl = impl.limitations
    assert Method.DORA in impl.methods
    assert Method.DORA in decl[Capability.MIXED_BATCH] and Method.DORA in decl[Capability.LORA_BIAS]
    base = make_base_layer(64, 48, bits=4, seed=3)
    params = {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}
    layer = impl.create(base, AdapterSpec(method="dora", params=params))
    assert layer.layer.use_dora["default"] is True
    mag = layer.adapter_parameters("default")[ndora.MAGNITUDE]
    assert mag is layer.layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # a trained magnitude: m/n != 1
        mag.mul_(torch.linspace(0.5, 1.5, mag.numel()))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    exp = ndora.dora_expected(base, layer.adapter_parameters("default"), 4.0, x)
    diff = (y.double() - exp.value).abs()
    assert bool((diff <= exp.bound).all()), _report("PEFT DoRA vs the oracle", diff, exp.bound)
    with pytest.raises(ValueError, match="adapter_names"):
        layer(x, adapter_names=["default"] * 5)
