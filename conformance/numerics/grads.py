"""Float64 output and gradients of an adapter layer on a quantized base, with componentwise bounds.

Oracle. The layer's math is re-evaluated in float64 autograd on what the implementation actually
holds: the dequantized base weight (``conformance.quant.dequantize``), the base bias, the adapter
tensors (``adapter_parameters``), the exact input ``x`` and upstream gradient ``g`` (loss
``L = sum(y * g)``, so ``dL/dy = g`` exactly); LoRA scaling ``alpha/r`` (``alpha/sqrt(r)`` with
rsLoRA), OFT rotations from ``conformance.numerics.cayley``.

Error bound (componentwise, first order in the rounding errors, Higham ch. 3 style). Every entry of
``y`` and of every gradient is a sum of products of the leaves (x, W, b, A, B, b_B, g; for OFT also
``S = (I+Q)^-1`` per block). Evaluating the *same* graph on absolute values ("magnitude graph",
float64 autograd of ``sum(|g| * y_abs)``) gives, for each output, the sum of the absolute values of
its terms, ``M``. Then, for an implementation that works in the compute dtype ``c``:

* rounding: each term passes through at most ``n_acc`` accumulations (the sum of every inner
  dimension on the longest path: in + out + r (or OFT block size) + rows summed in the batch) done
  in at least float32 for half types (same model as ``conformance.quant.matmul_rounding_bound``),
  and at most ``STORE_ROUNDINGS`` values stored/cast in ``c`` (counted below), so its relative error
  is at most ``rho = (1 + gamma_nacc(u_acc)) (1 + gamma_K(u_c)) - 1``: contribution ``rho * M``;
* leaf errors: the kernel's weight differs from the float32 dequantized one by at most
  ``(u_c + 4 u_32) |W|`` (4-bit: dequantize in float32 as ``dequantize`` does, then one cast to
  ``c``; 8-bit: ``CB * (SCB * (1/127))`` -- two float32 roundings each side and one cast to ``c``);
  the base bias may be cast to ``c`` (``u_c |b|``); OFT's ``S`` comes from a solve with the
  normwise relative error of ``conformance.numerics.cayley.solve_error``. A polynomial with
  nonnegative coefficients is monotone, so the propagated leaf error is at most
  ``M(|leaf| + E) - M(|leaf|)``; the rounding term uses ``M(|leaf| + E)``.

DoRA (``state.method == "dora"``) is ``conformance.numerics.dora.dora_grad_expected``: the same magnitude-graph
model with the norm ``||W0 + s B A||_c`` a detached leaf (its inverse known within the norm-and-division bound) and
the magnitude a leaf with a gradient; the weight leaf error derived as here (``WEIGHT_F32_ROUNDINGS``, the storage
rounding), the rounding dtype the coarsest of the compute, input and adapter dtypes, one active adapter.

``STORE_ROUNDINGS = 8`` counts the values stored in the compute dtype along the longest path (LoRA
gradient w.r.t. the input): base output ``x W^T`` (1), bias add (2), adapter output cast (3), sum
into the result (4); backward ``g W`` (5), adapter-path cast (6), sum of the two paths (7), cast to
the input's dtype (8). OFT: rotated input (1) then the base's four, backward the same.

The 8-bit outlier threshold (``state.threshold > 0``, LLM.int8(); bitsandbytes 0.50.2 ``autograd/_functions.py``)
adds no term, and the bound above holds as it stands:

* CPU, training mode (the backprop matrix's layers): ``matmul`` takes ``MatMul8bitFp``, whose forward is
  ``F.linear(A, CB.to(A.dtype) * (SCB * (1/127)))`` and whose ``grad_A`` is ``grad_output @ (the same
  dequantized CB)``; the threshold is never read, so a base at 6.0 computes what one at 0.0 does.
* CUDA (``MatMul8bitLt``, ``int8_input``): the backward's ``grad_A`` is ``grad_output.to(A.dtype) @
  (CB.to(A.dtype) * (SCB * (1/127)))``, the dequantized CB with no outlier term: the weight leaf error above. The
  forward quantizes the input with every value of at least the threshold zeroed (``int8_vectorwise_quant``): the
  remaining int8 operand is scaled by a row absmax no larger than the whole row's, which ``int8_input``'s
  ``absmax_row(h)/254`` already uses; the zeroed (outlier) columns contribute exactly nothing to the int8 product
  and are added back by ``int8_mixed_scaled_mm`` as ``A[:, cols] @ (CB[:, cols] * SCB / 127).to(A.dtype)^T``: the
  input as given (no input error) times the dequantized weight cast to the compute dtype (the weight leaf error),
  accumulated in the compute dtype (``rho``'s accumulation), and one more value stored in the compute dtype (the
  ``addmm`` sum), within the eight ``STORE_ROUNDINGS`` (the forward output's own path stores four).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers

from .blocks import oft_layout, rotate_input
from .cayley import rotation_blocks, solve_error
from .dora import dora_grad_expected
from .expected import lora_scaling
from .rounding import storage_rounding

BASE = "__base__"
"""The ``adapter_names`` entry of a mixed batch that selects the base layer alone (PEFT's name)."""
STORE_ROUNDINGS = 8
"""Values stored in the compute dtype along the longest forward+backward path (module docstring)."""
WEIGHT_F32_ROUNDINGS = 4
"""float32 roundings separating the kernel's weight from ``dequantize`` (module docstring)."""


class _MagnitudeInverse(torch.autograd.Function):
    """``S = (I+Q)^-1`` in the magnitude graph: value ``V`` (a majorant of |S|), backward ``V^T g V^T``.

    ``dS = -S dQ S``, so the true backward is ``-S^T g S^T``; on magnitudes every sign is +.
    """

    @staticmethod
    def forward(ctx: Any, qa: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return v.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (v,) = ctx.saved_tensors
        vt = v.transpose(-1, -2)
        return vt @ g @ vt, None


def _skew_abs(theta: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(b, b, 1)
    q = torch.zeros(theta.shape[0], b, b, dtype=theta.dtype)
    q[:, rows, cols] = theta
    return q + q.transpose(-1, -2)


@dataclass
class LayerState:
    """What the oracle reads from the implementation's layer (before the forward, except adapters)."""

    weight: torch.Tensor  # float64, out x in (dequantized)
    bias: torch.Tensor | None
    method: str
    params: dict[str, dict[str, Any]]  # adapter name -> spec params
    tensors: dict[str, dict[str, torch.Tensor]]  # adapter name -> canonical key -> float64 tensor
    param_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # adapter name -> its tensors' dtype
    # bitsandbytes' CUDA int8 path (autograd/_functions.py MatMul8bitLt, always taken on CUDA) quantizes
    # the base layer's input row-wise to int8 after a float16 cast: |h - h_q| <= absmax_row(h)/254 + u16|h|
    int8_input: bool = False
    #: ``rounding.storage_rounding`` of the base (a 4-bit base stored in float16/bfloat16)
    storage_rounding: float = 0.0
    #: adapter name -> canonical key -> the dtype the implementation holds the tensor in (DoRA's bound reads the
    #: adapter and magnitude dtypes; ``tensors`` are float64 copies)
    tensor_dtypes: dict[str, dict[str, torch.dtype]] = field(default_factory=dict)


@dataclass
class GradExpected:
    """Float64 value and componentwise error bound of the output and every gradient."""

    y: torch.Tensor
    y_bound: torch.Tensor
    grads: dict[str, torch.Tensor]  # "x" and "<adapter>:<canonical key>"
    grad_bounds: dict[str, torch.Tensor]


def _graph(state: LayerState, leaves: dict[str, torch.Tensor], x: torch.Tensor, names: Sequence[str] | None,
           active: Sequence[str], magnitude: bool, s_major: dict[str, torch.Tensor]) -> torch.Tensor:
    """y = layer(x) in float64, signed (oracle) or on magnitudes (all signs +, S from ``s_major``)."""
    w, b = leaves["W"], leaves.get("b")

    def base(h: torch.Tensor) -> torch.Tensor:
        y = h @ w.t()
        return y + b if b is not None else y

    def mask(rows_of: str) -> torch.Tensor:
        m = torch.tensor([1.0 if n == rows_of else 0.0 for n in names], dtype=torch.float64)
        return m.view(-1, *([1] * (x.dim() - 1)))

    used = list(dict.fromkeys(names)) if names is not None else list(active)
    if state.method == "lora":
        y = base(x)
        for name in used:
            if name == BASE:
                continue
            s = lora_scaling(state.params[name])
            delta = (x @ leaves[f"{name}:lora_A.weight"].t()) @ leaves[f"{name}:lora_B.weight"].t()
            if f"{name}:lora_B.bias" in leaves:
                delta = delta + leaves[f"{name}:lora_B.bias"]
            delta = s * delta
            y = y + (delta if names is None else mask(name) * delta)
        return y

    def rotate(name: str, h: torch.Tensor) -> torch.Tensor:
        p = state.params[name]
        n_blocks, bsz = oft_layout(x.shape[-1], p)
        theta = leaves[f"{name}:oft_R.weight"]
        terms = p.get("num_cayley_neumann_terms", 5) if p.get("use_cayley_neumann", False) else None
        if not magnitude:
            blocks = rotation_blocks(theta, bsz, terms)
        else:
            qa = _skew_abs(theta, bsz)
            eye = torch.eye(bsz, dtype=torch.float64).expand_as(qa)
            if terms is None:
                blocks = (eye + qa) @ _MagnitudeInverse.apply(qa, s_major[name])
            else:
                series, power = eye, eye
                for _ in range(terms - 2):
                    power = power @ qa
                    series = series + power
                blocks = (eye + qa) @ series if terms > 1 else series
        return rotate_input(h, blocks, n_blocks)

    if names is None:
        h = x
        for name in active:
            h = rotate(name, h)
        return base(h)
    h = x * mask(BASE) if BASE in used else torch.zeros_like(x)
    for name in used:
        if name != BASE:
            h = h + mask(name) * rotate(name, x)
    return base(h)


def grad_expected(state: LayerState, x: torch.Tensor, g: torch.Tensor, *, compute_dtype: torch.dtype,
             names: Sequence[str] | None = None, active: Sequence[str] = ("default",)) -> GradExpected:
    """Float64 output and gradients of ``L = sum(y * g)`` with componentwise bounds (module docstring; DoRA:
    ``_dora_grad_expected``)."""
    u_c = qbounds.unit_roundoff(compute_dtype)
    u_32 = qbounds.unit_roundoff(torch.float32)
    x64, g64 = x.detach().double().cpu(), g.detach().double().cpu()
    if state.method == "dora":
        return _dora_grad_expected(state, x64, g64, compute_dtype, names, active)

    leaves = {"W": state.weight, **({"b": state.bias} if state.bias is not None else {})}
    for name, ts in state.tensors.items():
        for key, t in ts.items():
            leaves[f"{name}:{key}"] = t
    w_rel = u_c + WEIGHT_F32_ROUNDINGS * u_32 + state.storage_rounding  # storage dtype: rounding.storage_rounding
    errs: dict[str, torch.Tensor] = {"W": w_rel * state.weight.abs()}
    if state.bias is not None:
        errs["b"] = u_c * state.bias.abs()

    # accumulation length and OFT solve errors
    rows = max(1, x64.numel() // x64.shape[-1])
    width, s_abs, s_err = 0, {}, {}
    for name, p in state.params.items():
        if state.method == "lora":
            width = max(width, int(p.get("r", 8)))
        else:
            _, bsz = oft_layout(x64.shape[-1], p)
            terms = p.get("num_cayley_neumann_terms", 5) if p.get("use_cayley_neumann", False) else 1
            width = max(width, bsz * terms)
            # the rotation is computed in the adapter parameters' dtype (PEFT casts x up to it, oft/layer.py);
            # an implementation that solves in a coarser dtype violates this model on purpose
            u_rot = max(u_32, qbounds.unit_roundoff(state.param_dtypes.get(name, torch.float32)))
            s_abs[name], s_err[name] = solve_error(state.tensors[name]["oft_R.weight"], bsz, u_rot)
    n_acc = x64.shape[-1] + state.weight.shape[0] + width + rows
    u_acc = min(u_c, u_32)
    rho = (1 + qbounds.gamma(n_acc, u_acc)) * (1 + qbounds.gamma(STORE_ROUNDINGS, u_c)) - 1
    rho += qbounds.gamma(n_acc + STORE_ROUNDINGS, qbounds.unit_roundoff(torch.float64))  # the oracle's own

    grad_keys = [k for k in leaves if ":" in k]

    def run(vals: dict[str, torch.Tensor], xv: torch.Tensor, gv: torch.Tensor, magnitude: bool,
            s_major: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lv = {k: v.detach().clone().requires_grad_(k in grad_keys) for k, v in vals.items()}
        xr = xv.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = _graph(state, lv, xr, names, active, magnitude, s_major)
            inputs = [xr] + [lv[k] for k in grad_keys]
            gs = torch.autograd.grad((y * gv).sum(), inputs, allow_unused=True)
        out = {"x": gs[0]}
        out.update({k: gr if gr is not None else torch.zeros_like(lv[k]) for k, gr in zip(grad_keys, gs[1:])})
        return y.detach(), {k: v.detach() if v is not None else torch.zeros_like(x64) for k, v in out.items()}

    y, grads = run(leaves, x64, g64, False, {})
    small = {k: v.abs() for k, v in leaves.items()}
    big = {k: v.abs() + errs.get(k, 0) for k, v in leaves.items()}
    y_s, m_s = run(small, x64.abs(), g64.abs(), True, s_abs)
    x_big = x64.abs()
    if state.int8_input:
        # error of the int8-quantized base input, entered at x (conservative: for OFT the base input is
        # h = x R with |h_i| <= ||x_row||_2, and propagating an error e at x through |R| gives >= e at h)
        x_big = x_big + _int8_input_error(x64, state.method)
    y_b, m_b = run(big, x_big, g64.abs(), True, {n: s_abs[n] + s_err[n] for n in s_abs})

    def bound(b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # an infinite leaf error (ill-conditioned solve) gives no bound: inf, never NaN
        return torch.nan_to_num((b - s) + rho * b, nan=math.inf)

    y_bound = bound(y_b, y_s)
    grad_bounds = {k: bound(m_b[k], m_s[k]) for k in grads}
    return GradExpected(y, y_bound, grads, grad_bounds)


def _int8_input_error(x64: torch.Tensor, method: str) -> torch.Tensor:
    """Bound on the int8-quantized base input's error, per element of ``x`` (``LayerState.int8_input``)."""
    row = x64.abs().amax(dim=-1, keepdim=True) if method != "oft" else x64.norm(dim=-1, keepdim=True)
    return (row / 254 + qbounds.unit_roundoff(torch.float16) * row).expand_as(x64)


def _dora_grad_expected(state: LayerState, x64: torch.Tensor, g64: torch.Tensor, compute_dtype: torch.dtype,
                        names: Sequence[str] | None, active: Sequence[str]) -> GradExpected:
    """DoRA: ``conformance.numerics.dora.dora_grad_expected`` (the norm detached; the magnitude gets a gradient), one
    active adapter, no mixed batch (PEFT refuses ``adapter_names`` with DoRA). Its arguments are derived as above:
    the kernel weight's relative error ``u_c + WEIGHT_F32_ROUNDINGS u_32 + storage_rounding``; the tensors in the
    dtypes the implementation holds them in (their float64 copies are exact in those); the rounding dtype the
    coarsest of the compute, input and adapter dtypes; the int8 input error (CUDA) entered at ``x``."""
    if names is not None:
        raise ValueError("DoRA takes no adapter_names (PEFT: 'Cannot pass `adapter_names` when DoRA is enabled.'); "
                         "compute a DoRA layer's gradients without names")
    if len(active) != 1:
        raise ValueError(f"the DoRA gradient oracle models one active adapter, got {list(active)}; "
                         "activate one adapter")
    name = active[0]
    tensors = {k: v.to(state.tensor_dtypes.get(name, {}).get(k, state.param_dtypes.get(name, torch.float32)))
               for k, v in state.tensors[name].items()}
    coarse = max((compute_dtype, tensors["lora_A.weight"].dtype, tensors["lora_B.weight"].dtype),
                 key=qbounds.unit_roundoff)
    w_rel = (qbounds.unit_roundoff(compute_dtype) + WEIGHT_F32_ROUNDINGS * qbounds.unit_roundoff(torch.float32)
             + state.storage_rounding)
    exp = dora_grad_expected(state.weight, state.bias, tensors, lora_scaling(state.params[name]), x64, g64,
                             compute_dtype=coarse, weight_rel=w_rel,
                             x_err=_int8_input_error(x64, state.method) if state.int8_input else None)
    prefix = {k: k if k == "x" else f"{name}:{k}" for k in exp.grads}
    return GradExpected(exp.y, exp.y_bound, {prefix[k]: v for k, v in exp.grads.items()},
                        {prefix[k]: v for k, v in exp.grad_bounds.items()})


def read_state(layer: nn.Module, method: str, params: dict[str, dict[str, Any]]) -> LayerState:
    """The base weight/bias (call before the first forward: bnb may cast the bias) and adapter tensors."""
    base = layer.base_layer
    w = qlayers.dequantize(base).double().cpu()  # the float64 oracle runs on the CPU, whatever the device
    bias = getattr(base, "bias", None)
    return LayerState(
        w, None if bias is None else bias.detach().double().cpu().clone(), method, dict(params),
        {n: {k: v.detach().double().cpu().clone() for k, v in layer.adapter_parameters(n).items()} for n in params},
        {n: next(iter(layer.adapter_parameters(n).values())).dtype for n in params},
        int8_input=qlayers.bits_of(base) == 8 and base.weight.device.type == "cuda",
        storage_rounding=storage_rounding(base),
        tensor_dtypes={n: {k: v.dtype for k, v in layer.adapter_parameters(n).items()} for n in params},
    )


def refresh_adapters(state: LayerState, layer: nn.Module) -> None:
    """Re-read adapter tensors after the forward (COFT projects its parameters in place there)."""
    for n in state.tensors:
        state.tensors[n] = {k: v.detach().double().cpu().clone() for k, v in layer.adapter_parameters(n).items()}
