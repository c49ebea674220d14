"""Backprop through adapter layers on quantized bases: gradients vs float64, forward without grad.

Seed 000 (``peft/tuners/lora/bnb.py``: "As per Tim Dettmers, for 4bit, we need to defensively clone
here ... backprop does not work on a manipulated view"): training through a bitsandbytes base must
give the gradients of the math, for every input rank, dtype and batch layout; the probe
``python -m conformance probe clone`` asks whether the clone is still needed, these clauses ask
whether an implementation's gradients are right (whatever it does about the clone).

Float64 oracle. The layer's math is re-evaluated in float64 autograd on what the implementation
actually holds: the dequantized base weight (``conformance.quant.dequantize``), the base bias, the
adapter tensors (``adapter_parameters``), the exact input ``x`` and upstream gradient ``g``
(loss ``L = sum(y * g)``, so ``dL/dy = g`` exactly); LoRA scaling from the spec
(``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA), OFT rotations from ``conformance.reference.rotation``.

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
  the base bias may be cast to ``c`` (``u_c |b|``); OFT's ``S`` comes from a solve with normwise
  relative error ``eta = 2 eps kappa / (1 - eps kappa)``, ``eps = gamma_3b(u_c) || |L||U| || / ||A||``
  (Higham Thm 9.4 + 7.2, LU with partial pivoting of ``A = I + Q`` evaluated in float64). A polynomial
  with nonnegative coefficients is monotone, so the propagated leaf error is at most
  ``M(|leaf| + E) - M(|leaf|)``; the rounding term uses ``M(|leaf| + E)``.

``STORE_ROUNDINGS = 8`` counts the values stored in the compute dtype along the longest path (LoRA
gradient w.r.t. the input): base output ``x W^T`` (1), bias add (2), adapter output cast (3), sum
into the result (4); backward ``g W`` (5), adapter-path cast (6), sum of the two paths (7), cast to
the input's dtype (8). OFT: rotated input (1) then the base's four, backward the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conformance.harness.context import CheckContext
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.reference import rotation
from conformance.spec.clauses import check

from ..cases import AdapterCase, BaseCase, adapter_cases

BASE = "__base__"
STORE_ROUNDINGS = 8
"""Values stored in the compute dtype along the longest forward+backward path (module docstring)."""
WEIGHT_F32_ROUNDINGS = 4
"""float32 roundings separating the kernel's weight from ``dequantize`` (module docstring)."""

IN_FEATURES, OUT_FEATURES = 64, 48
BATCH_SIZES = (1, 3)
INPUT_RANKS = (1, 2, 3)
SEQ_LEN = 2
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (bits, quant type); 8-bit has no quant type
QUANTS = ((4, "nf4"), (4, "fp4"), (8, "int8"))


# --------------------------------------------------------------------------------------------------
# the case matrix
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradCase:
    """One forward/backward: base layer, adapter, input layout, and (mixed batch) per-sample names."""

    method: str
    bits: int
    quant_type: str
    dtype: torch.dtype
    rank: int
    batch: int
    x_requires_grad: bool
    adapter: AdapterCase
    mixed: bool = False
    second: AdapterCase | None = field(default=None, compare=False)

    @property
    def base(self) -> BaseCase:
        qt = self.quant_type if self.bits == 4 else "nf4"
        return BaseCase(self.bits, IN_FEATURES, OUT_FEATURES, quant_type=qt, compute_dtype=self.dtype)

    def input_shape(self) -> tuple[int, ...]:
        if self.rank == 1:
            return (IN_FEATURES,)
        if self.rank == 2:
            return (self.batch, IN_FEATURES)
        return (self.batch, SEQ_LEN, IN_FEATURES)

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.input_shape()))
        grad = "xgrad" if self.x_requires_grad else "xnograd"
        mixed = "-mixed" if self.mixed else ""
        return f"{self.adapter.label}/{self.base.label}/in{shape}-{grad}{mixed}"


def pairwise(factors: Mapping[str, Sequence[Any]], valid: Callable[[dict[str, Any]], bool] | None = None
             ) -> list[dict[str, Any]]:
    """Deterministic all-pairs covering of a cross product (greedy, first-best in product order).

    Every pair of values of two factors that occurs in some valid combination occurs in a chosen
    one; a handful of cases instead of the full product (Cohen et al., AETG, 1997).
    """
    names = list(factors)
    full = [dict(zip(names, combo)) for combo in itertools.product(*factors.values())]
    full = [c for c in full if valid is None or valid(c)]

    def pairs(c: dict[str, Any]) -> set[tuple[str, Any, str, Any]]:
        return {(a, repr(c[a]), b, repr(c[b])) for i, a in enumerate(names) for b in names[i + 1:]}

    uncovered: set[tuple[str, Any, str, Any]] = set().union(*(pairs(c) for c in full)) if full else set()
    chosen: list[dict[str, Any]] = []
    while uncovered:
        best = max(full, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def _quants_for(bits: Sequence[int]) -> list[tuple[int, str]]:
    return [q for q in QUANTS if q[0] in bits]


def grad_matrix(method: str, bits: Sequence[int], *, mixed: bool = False) -> list[GradCase]:
    """The sampled matrix of the BACKPROP clauses (pairwise over every factor), one method."""
    adapters = adapter_cases(method)
    factors: dict[str, Sequence[Any]] = {
        "quant": _quants_for(bits), "dtype": DTYPES, "rank": (2, 3) if mixed else INPUT_RANKS,
        "batch": (4,) if mixed else BATCH_SIZES, "xgrad": (True, False), "adapter": range(len(adapters)),
    }
    out = []
    for c in pairwise(factors, valid=lambda c: c["rank"] > 1 or c["batch"] == 1):
        (b, qt), a = c["quant"], c["adapter"]
        out.append(GradCase(method, b, qt, c["dtype"], c["rank"], c["batch"], c["xgrad"], adapters[a], mixed,
                            second=adapters[(a + 1) % len(adapters)] if mixed else None))
    return out


# --------------------------------------------------------------------------------------------------
# float64 oracle and magnitude graph
# --------------------------------------------------------------------------------------------------
def lora_scaling(params: Mapping[str, Any]) -> float:
    r, alpha = params.get("r", 8), params.get("lora_alpha", 8)
    return float(alpha) / (math.sqrt(r) if params.get("use_rslora", False) else r)


def oft_layout(in_features: int, params: Mapping[str, Any]) -> tuple[int, int]:
    """(number of blocks, block size) from r / oft_block_size (exactly one is set)."""
    r, bs = params.get("r", 8), params.get("oft_block_size", 0)
    blocks = r if r else in_features // bs
    return blocks, in_features // blocks


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


def _solve_error(theta: torch.Tensor, b: int, u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(|S|, per-block entrywise bound on |S_computed - S|) for S = (I+Q)^-1 (module docstring)."""
    q = rotation.skew(theta.double(), b)
    a = torch.eye(b, dtype=torch.float64) + q
    s = torch.linalg.inv(a)
    p, lo, up = torch.linalg.lu(a)
    inf = lambda m: m.abs().sum(-1).amax(-1)  # noqa: E731  (infinity norm per block)
    growth = inf(lo.abs() @ up.abs()) / inf(a)
    kappa = inf(a) * inf(s)
    eps = qbounds.gamma(3 * b, u) * growth
    ek = eps * kappa
    eta = torch.where(ek < 1, 2 * ek / (1 - ek).clamp_min(1e-300), torch.full_like(ek, math.inf))
    # entrywise: |dR_ij| <= ||dR||_inf <= eta ||S||_inf ||I-Q||_inf and every row sum of |I-Q| is >= 1,
    # so E_S = eta ||S|| ||I-Q|| per entry majorizes the propagated error through R = (I-Q) S.
    e = (eta * inf(s) * inf(a))[:, None, None].expand_as(s).clone()
    return s.abs(), e


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


@dataclass
class Expected:
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
            blocks = rotation.cayley(rotation.skew(theta, bsz), neumann_terms=terms)
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
        return rotation.rotate_input(h, blocks, n_blocks)

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


def expected(state: LayerState, x: torch.Tensor, g: torch.Tensor, *, compute_dtype: torch.dtype,
             names: Sequence[str] | None = None, active: Sequence[str] = ("default",)) -> Expected:
    """Float64 output and gradients of ``L = sum(y * g)`` with componentwise bounds (module docstring)."""
    u_c = qbounds.unit_roundoff(compute_dtype)
    u_32 = qbounds.unit_roundoff(torch.float32)
    x64, g64 = x.detach().double().cpu(), g.detach().double().cpu()

    leaves = {"W": state.weight, **({"b": state.bias} if state.bias is not None else {})}
    for name, ts in state.tensors.items():
        for key, t in ts.items():
            leaves[f"{name}:{key}"] = t
    errs: dict[str, torch.Tensor] = {"W": (u_c + WEIGHT_F32_ROUNDINGS * u_32) * state.weight.abs()}
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
            s_abs[name], s_err[name] = _solve_error(state.tensors[name]["oft_R.weight"], bsz, u_rot)
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
        row = x64.abs().amax(dim=-1, keepdim=True) if state.method == "lora" else x64.norm(dim=-1, keepdim=True)
        x_big = x_big + row / 254 + qbounds.unit_roundoff(torch.float16) * row
    y_b, m_b = run(big, x_big, g64.abs(), True, {n: s_abs[n] + s_err[n] for n in s_abs})

    def bound(b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # an infinite leaf error (ill-conditioned solve) gives no bound: inf, never NaN
        return torch.nan_to_num((b - s) + rho * b, nan=math.inf)

    y_bound = bound(y_b, y_s)
    grad_bounds = {k: bound(m_b[k], m_s[k]) for k in grads}
    return Expected(y, y_bound, grads, grad_bounds)


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
    )


def refresh_adapters(state: LayerState, layer: nn.Module) -> None:
    """Re-read adapter tensors after the forward (COFT projects its parameters in place there)."""
    for n in state.tensors:
        state.tensors[n] = {k: v.detach().double().cpu().clone() for k, v in layer.adapter_parameters(n).items()}


def violation(got: torch.Tensor, exp: torch.Tensor, bound: torch.Tensor) -> tuple[float, str]:
    """(worst |got - exp| / bound, description of the worst entry); inf where the bound is 0 and got differs."""
    exp, bound = exp.detach().double().cpu(), bound.detach().double().cpu()
    err = (got.detach().double().cpu() - exp).abs()
    if got.shape != exp.shape:
        return math.inf, f"shape {tuple(got.shape)} != expected {tuple(exp.shape)}"
    if not torch.isfinite(err).all():
        return math.inf, "non-finite values"
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0))
    i = int(ratio.flatten().argmax())
    return float(ratio.flatten()[i]), (
        f"entry {i}: got {got.detach().double().flatten()[i].item():.6g}, expected {exp.flatten()[i].item():.6g} "
        f"+- {bound.flatten()[i].item():.3g}"
    )


# --------------------------------------------------------------------------------------------------
# running one case against the implementation
# --------------------------------------------------------------------------------------------------
def _build(ctx: CheckContext, case: GradCase) -> tuple[nn.Module, dict[str, dict[str, Any]], list[str] | None]:
    base = ctx.make_base(IN_FEATURES, OUT_FEATURES, **case.base.kwargs())
    layer = ctx.make_layer(base, case.method, **case.adapter.params)
    params = {"default": dict(case.adapter.params)}
    names = None
    if case.mixed:
        if "multi_adapter" in ctx.impl.capabilities and case.second is not None:
            torch.manual_seed(ctx.seed + 1)
            layer.add_adapter("other", **case.second.params)
            params["other"] = dict(case.second.params)
            layer.set_adapter(["default", "other"])
            names = ["default", BASE, "other", "default"][: case.batch]
        else:
            names = ["default", BASE, "default", BASE][: case.batch]
    return layer, params, names


def _grad_case(ctx: CheckContext, case: GradCase, offset: int) -> float:
    """Forward + backward one case, compare output and gradients with the oracle; worst ratio."""
    layer, params, names = _build(ctx, case)
    state = read_state(layer, case.method, params)
    x = ctx.randn(*case.input_shape(), dtype=case.dtype, offset=offset).requires_grad_(case.x_requires_grad)
    try:
        y = layer(x) if names is None else layer(x, adapter_names=names)
        g = ctx.randn(*y.shape, dtype=y.dtype, offset=offset + 1)
        (y * g).sum().backward()
    except Exception as exc:  # noqa: BLE001  (an implementation's exception is the finding)
        ctx.fail(f"{case.label}: forward/backward raised {type(exc).__name__}: {exc}")
    refresh_adapters(state, layer)
    active = list(params) if names is None else ["default"]
    exp = expected(state, x, g, compute_dtype=case.dtype, names=names, active=active)
    worst = 0.0
    checks: list[tuple[str, torch.Tensor | None, torch.Tensor, torch.Tensor]] = [("output", y, exp.y, exp.y_bound)]
    if case.x_requires_grad:
        checks.append(("grad wrt input", x.grad, exp.grads["x"], exp.grad_bounds["x"]))
    for name in params:
        for key, p in layer.adapter_parameters(name).items():
            if not p.requires_grad:
                continue
            k = f"{name}:{key}"
            checks.append((f"grad wrt {k}", p.grad, exp.grads[k], exp.grad_bounds[k]))
    for what, got, e, bnd in checks:
        if got is None:
            if bool((e != 0).any()):
                ctx.fail(f"{case.label}: {what} is None (no gradient reached it), expected nonzero gradient")
            continue
        ratio, where = violation(got, e, bnd)
        worst = max(worst, ratio)
        if ratio > 1:
            ctx.fail(f"{case.label}: {what} differs from the float64 computation beyond the rounding bound "
                     f"(ratio {ratio:.3g}); {where}")
    return worst


def _run_matrix(ctx: CheckContext, mixed: bool) -> None:
    n = 0
    for method, bits in _method_bits(ctx):
        for i, case in enumerate(grad_matrix(method, bits, mixed=mixed)):
            if not all(ctx.supports(a.params, case.label) for a in (case.adapter, case.second) if a is not None):
                continue
            ratio = _grad_case(ctx, case, offset=100 * i)
            dt = str(case.dtype).removeprefix("torch.")
            ctx.measure_max(f"{method}.{dt}.worst_ratio", ratio)
            n += 1
    ctx.measure("cases", n)


def _method_bits(ctx: CheckContext) -> Iterator[tuple[str, list[int]]]:
    pairs = list(ctx.cases())
    for method in dict.fromkeys(m for m, _ in pairs):
        yield method, sorted(b for m, b in pairs if m == method)


@check("BACKPROP-GRAD-F64")
def check_grad_f64(ctx: CheckContext) -> None:
    _run_matrix(ctx, mixed=False)


@check("BACKPROP-MIXED-GRAD-F64")
def check_mixed_grad_f64(ctx: CheckContext) -> None:
    _run_matrix(ctx, mixed=True)


MODES: dict[str, Callable[[], Any]] = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@check("BACKPROP-NOGRAD-FORWARD")
def check_nograd_forward(ctx: CheckContext) -> None:
    n = bitwise = 0
    for method, bits in _method_bits(ctx):
        for i, case in enumerate(grad_matrix(method, bits)):
            if not all(ctx.supports(a.params, case.label) for a in (case.adapter, case.second) if a is not None):
                continue
            layer, params, _ = _build(ctx, case)
            state = read_state(layer, case.method, params)
            x = ctx.randn(*case.input_shape(), dtype=case.dtype, offset=100 * i)
            outs: dict[str, torch.Tensor] = {}
            for mode in ("inference_mode", "no_grad", "grad"):
                xm = x.clone().requires_grad_(case.x_requires_grad and mode == "grad")
                try:
                    if mode == "grad":
                        y = layer(xm)
                        y.sum().backward()
                    else:
                        with MODES[mode]():
                            y = layer(xm)
                except Exception as exc:  # noqa: BLE001
                    after = " after inference_mode/no_grad forwards" if mode == "grad" else ""
                    ctx.fail(f"{case.label}: forward under {mode}{after} raised {type(exc).__name__}: {exc}")
                if mode != "grad" and y.requires_grad:
                    ctx.fail(f"{case.label}: output under {mode} requires grad (it must not build a graph)")
                outs[mode] = y.detach().clone() if mode == "grad" else y.clone()
            refresh_adapters(state, layer)
            exp = expected(state, x, torch.ones_like(outs["grad"]), compute_dtype=case.dtype)
            for mode in MODES:
                ratio, where = violation(outs[mode], outs["grad"].double(), 2 * exp.y_bound)
                ctx.bounded(f"{method}.{mode}_vs_grad_ratio", ratio, lambda: (
                    f"{case.label}: output under {mode} differs from the grad-mode output beyond twice the "
                    f"rounding bound (ratio {ratio:.3g}); {where}"))
                bitwise += int(torch.equal(outs[mode], outs["grad"]))
            n += 1
    ctx.measure("cases", n)
    ctx.measure("bitwise_equal_mode_outputs", bitwise)
    ctx.measure("mode_outputs_compared", 2 * n)
