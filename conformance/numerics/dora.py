"""DoRA (weight-decomposed low-rank adaptation, arXiv:2402.09353) in float64, and the rounding of its extra steps.

The math, as PEFT 0.21.2 composes it on a bitsandbytes layer (``peft/tuners/lora/dora.py`` ``DoraLinearLayer``,
``peft/tuners/lora/variants.py`` ``DoraLinearVariant``, ``peft/tuners/lora/bnb.py``), with ``W0`` the dequantized
base weight (``conformance.quant.dequantize``, PEFT's ``dequantize_bnb_weight``), ``s`` the LoRA scaling, ``m`` the
magnitude vector (``lora_magnitude_vector``, one entry per output feature), ``d(x)`` the adapter's dropout:

- the weight norm ``n = ||W0 + s B A||_c``, the 2-norm of each *row* of the (out x in) weight, i.e. of each column
  of the paper's (in x out) ``W``; ``f = m / n`` the DoRA factor;
- forward: ``y = base(x) + (f - 1) * W0 d(x) + f * s * B A d(x)``; the bias is added once, by the base layer.
  Without dropout (or in eval mode) PEFT reads ``W0 x`` as ``base(x) - bias`` and ``y = f (W0 + s B A) x + bias``;
- the norm is *detached* (paper section 4.3: "we suggest treating ||V + dV||_c in Eq. (5) as a constant, thereby
  detaching it from the gradient graph"): gradients w.r.t. ``A``, ``B`` and ``m`` see ``n`` as a constant;
- merge: ``W1 = f (W0 + s B A)`` with ``n`` taken on the *unmerged* weight and kept; unmerge:
  ``W0 = W1 / f - s B A`` with that kept norm (PEFT caches it as ``<adapter>-weight_norm``);
- initialisation: ``m = n`` at the initial ``A``, ``B`` (``B = 0``: the row norms of ``W0``), so the adapter starts
  as the identity;
- several active adapters compose in sequence (``dora_stack_expected``): without dropout each one's base term is the
  output so far minus the bias, the composition PEFT's merge makes too.

Where PEFT and the paper differ. Dropout: the paper writes ``W' = m (W0 + B A) / ||W0 + B A||_c`` applied to the
input, with dropout on the low-rank branch, i.e. ``f W0 x + f s B A d(x)``; PEFT in train mode with an active dropout
computes the magnitude term on the *dropped* input, ``W0 x + (f - 1) W0 d(x) + f s B A d(x)``. Both have the same
mean over dropout masks (inverted dropout: ``E[d(x)] = x``) and agree exactly without dropout or in eval mode. The
yardstick follows PEFT (MUST: ``magnitude_on_dropped=True``, the default); the paper's form is the SHOULD note
(``magnitude_on_dropped=False``).

Bounds (standard floating-point error analysis, Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3;
``fl(a op b) = (a op b)(1 + delta)``, ``|delta| <= u``; ``gamma_n = n u / (1 - n u)``; no fitted constant):

- the norm (``norm_expected``): the row ``v = W0 + s B A`` is formed in dtype ``d`` within ``e_v`` elementwise;
  ``| ||v_hat|| - ||v|| | <= ||v_hat - v|| <= ||e_v||`` (reverse triangle inequality). Evaluating ``||v_hat||``: each
  square and the ``n - 1`` additions give ``fl(sum v_i^2) = sum v_i^2 (1 + theta_i)``, ``|theta_i| <= gamma_n``, and
  since every term is nonnegative ``= S (1 + theta)``, ``|theta| <= gamma_n``; ``sqrt(S (1 + theta)) = ||v|| sqrt(1 +
  theta)`` with ``|sqrt(1 + t) - 1| <= |t|``; the square root rounds once, and a reduction that accumulates in float32
  rounds once more to ``d``: ``rho_n = (1 + gamma_n)(1 + u)^2 - 1``. Total ``E_n = ||e_v|| + rho_n (n + ||e_v||)``;
- the division (``factor_expected``): ``f_hat = fl(m / n_hat)`` with ``n_hat`` in ``[n - E_n, n + E_n]``; over that
  interval ``|f_hat - f| <= |m| ((1 + u) / (n - E_n) - 1 / n)`` (the far end is the lower one: ``1/t`` is convex), a
  magnitude stored in a wider dtype than ``d`` contributing one more factor ``(1 + u)``; no bound when ``n <= E_n``;
- the rescaling (``dora_expected``): every product and sum of values known within a bound is propagated exactly,
  ``|a_hat b_hat - a b| <= |a| e_b + |b| e_a + e_a e_b`` and ``|(a_hat + b_hat) - (a + b)| <= e_a + e_b``, and each
  rounds once relative to the magnitude of what it rounds (the exact value plus every error before it), as in
  ``conformance.numerics.expected``. The extra operations run in the adapter dtype or in the output dtype (PEFT
  promotes between them); each is bounded with the coarser unit roundoff of the two;
- merge (``dora_merge_error``) in float32 (what ``dequantize`` returns) and the roundtrip merge -> unmerge
  (``dora_roundtrip_bound``), which reuses the very ``f_hat`` and delta the merge used (PEFT's cached norm):
  derivation in the docstrings; the requantizations are added as ``conformance.quant.weight_bound``;
- gradients (``dora_grad_expected``): the magnitude-graph model of ``conformance.numerics.grads`` with ``1/n`` a leaf
  known within the norm-and-division bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers

from .expected import Expected, linear_expected, lora_delta_error, lora_tensors
from .rounding import U32, cast_error, gamma_n

MAGNITUDE = "lora_magnitude_vector.weight"
"""The magnitude vector's canonical (``adapter_parameters``) name; PEFT: ``lora_magnitude_vector[name].weight``."""


# -- exact float64 math ----------------------------------------------------------------------

def weight_norm(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W0 + s B A||_c``: the 2-norm of each row of the (out x in) weight (PEFT ``get_weight_norm``, dim=1).
    Autograd-able when its arguments are (float64 in, float64 out)."""
    return torch.linalg.vector_norm(w0 + scaling * (b @ a), dim=1)


def dora_output(
    x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
    magnitude: torch.Tensor, scaling: float, *, keep: torch.Tensor | None = None, detach_norm: bool = True,
    magnitude_on_dropped: bool = True,
) -> torch.Tensor:
    """DoRA's output in the dtype of its arguments (float64 for the oracle), autograd-able.

    ``keep``: the dropout multiplier (0 or ``1/(1-p)`` per element, shape of ``x``), None without dropout.
    ``detach_norm``: the norm a constant (paper section 4.3, PEFT); False differentiates through it (what PEFT
    and the paper do *not* do: the comparison that shows the norm is detached). ``magnitude_on_dropped``: PEFT's
    composition (module docstring) or, False, the paper's ``f W0 x + f s B A d(x)``.
    """
    xd = x if keep is None else x * keep
    norm = weight_norm(w0, a, b, scaling)
    if detach_norm:
        norm = norm.detach()
    f = magnitude / norm
    base = x @ w0.t()
    lora = scaling * ((xd @ a.t()) @ b.t())
    if magnitude_on_dropped:
        y = base + (f - 1) * (xd @ w0.t()) + f * lora
    else:
        y = f * base + f * lora
    return y + bias if bias is not None else y


def dora_grads(
    x: torch.Tensor, g: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None,
    tensors: Mapping[str, torch.Tensor], scaling: float, *, keep: torch.Tensor | None = None,
    detach_norm: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(y, gradients of ``L = sum(y * g)``) in float64: keys ``x``, ``lora_A.weight``, ``lora_B.weight`` and
    ``MAGNITUDE``; ``detach_norm`` as in ``dora_output``."""
    leaves = {k: tensors[k].detach().double().cpu().clone().requires_grad_(True)
              for k in ("lora_A.weight", "lora_B.weight", MAGNITUDE)}
    xv = x.detach().double().cpu().clone().requires_grad_(True)
    kv = None if keep is None else keep.detach().double().cpu()
    with torch.enable_grad():
        y = dora_output(xv, w0.double().cpu(), None if bias is None else bias.double().cpu(),
                        leaves["lora_A.weight"], leaves["lora_B.weight"], leaves[MAGNITUDE], scaling,
                        keep=kv, detach_norm=detach_norm)
        gs = torch.autograd.grad((y * g.detach().double().cpu()).sum(), [xv, *leaves.values()])
    return y.detach(), dict(zip(["x", *leaves], (t.detach() for t in gs)))


def dora_merged_weight(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """``(m / ||W0 + s B A||_c) (W0 + s B A)`` exactly (``W0``: the unmerged weight the norm is taken on)."""
    a, b, _ = lora_tensors(tensors)
    v = w0.double().cpu() + scaling * (b @ a)
    f = tensors[MAGNITUDE].detach().double().cpu() / torch.linalg.vector_norm(v, dim=1)
    return f[:, None] * v


def dora_unmerged_weight(w1: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float,
                         norm: torch.Tensor) -> torch.Tensor:
    """``W1 / (m / norm) - s B A`` exactly, ``norm`` the one the merge kept (PEFT ``DoraLinearVariant.unmerge``)."""
    a, b, _ = lora_tensors(tensors)
    f = tensors[MAGNITUDE].detach().double().cpu() / norm.double().cpu()
    return w1.double().cpu() / f[:, None] - scaling * (b @ a)


# -- propagation of value +- bound -----------------------------------------------------------

def _const(v: torch.Tensor | float, like: torch.Tensor | None = None) -> Expected:
    t = torch.as_tensor(v, dtype=torch.float64) if like is None else torch.full_like(like, float(v))
    return Expected(t, torch.zeros_like(t))


def _round(p: Expected, u: float) -> Expected:
    """One rounding of ``p``'s computed value: ``u`` times its magnitude (value plus error so far)."""
    return Expected(p.value, p.bound + u * (p.value.abs() + p.bound))


def _mul(p: Expected, q: Expected, u: float) -> Expected:
    err = p.value.abs() * q.bound + q.value.abs() * p.bound + p.bound * q.bound
    return _round(Expected(p.value * q.value, err), u)


def _add(p: Expected, q: Expected, u: float) -> Expected:
    return _round(Expected(p.value + q.value, p.bound + q.bound), u)


def _matmul(p: Expected, w: torch.Tensor, dtype: torch.dtype) -> Expected:
    """``p @ w^T`` computed in ``dtype`` (``quant.matmul_rounding_bound``: the weight rounded once, accumulation in
    at least float32, the result rounded once) on an input known within ``p.bound``; ``w`` exact."""
    w_abs = w.abs()
    err = p.bound @ w_abs.t() + qbounds.matmul_rounding_bound(p.value.abs() + p.bound, w_abs, dtype)
    return Expected(p.value @ w.t(), err)


# -- the norm and the factor -----------------------------------------------------------------

def norm_rounding(in_features: int, dtype: torch.dtype) -> float:
    """``rho_n = (1 + gamma_n)(1 + u)^2 - 1``: the relative error of evaluating a row's 2-norm in ``dtype``
    (module docstring)."""
    u = qbounds.unit_roundoff(dtype)
    return (1 + gamma_n(in_features, dtype)) * (1 + u) ** 2 - 1


def norm_expected(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float, dtype: torch.dtype,
                  *, w0_dtype: torch.dtype = torch.float32, w0_err: torch.Tensor | None = None) -> Expected:
    """The exact norm ``||W0 + s B A||_c`` and the bound ``E_n`` on computing it in ``dtype`` (module docstring).

    ``v`` is formed as PEFT does: ``W0`` (stored in ``w0_dtype``, known within ``w0_err``) cast to ``dtype``; the
    delta ``s (B @ A)`` in the adapter dtype (``expected.lora_delta_error``: ``gamma_r`` of the product and one
    rounding of the scaling) cast to ``dtype``; their sum rounded once."""
    a, b, _ = lora_tensors(tensors)
    t = tensors["lora_A.weight"].dtype
    u = qbounds.unit_roundoff(dtype)
    w = w0.double().cpu()
    delta = scaling * (b @ a)
    e_d = lora_delta_error(tensors, scaling)
    e_d = e_d + cast_error(t, dtype) * (delta.abs() + e_d)
    e_w = (torch.zeros_like(w) if w0_err is None else w0_err.double().cpu()) + cast_error(w0_dtype, dtype) * w.abs()
    v = w + delta
    e_v = e_w + e_d + u * (v.abs() + e_w + e_d)
    n = torch.linalg.vector_norm(v, dim=1)
    ev = torch.linalg.vector_norm(e_v, dim=1)
    return Expected(n, ev + norm_rounding(w.shape[1], dtype) * (n + ev))


def factor_expected(magnitude: torch.Tensor, norm: Expected, dtype: torch.dtype) -> Expected:
    """``f = m / n`` and the bound on ``fl(m / n_hat)`` in ``dtype`` (module docstring); inf where ``n <= E_n``."""
    m = magnitude.detach().double().cpu()
    u = qbounds.unit_roundoff(dtype)
    c = cast_error(magnitude.dtype, dtype)
    n, e_n = norm.value, norm.bound
    low = n - e_n
    safe = low > 0
    err = torch.where(safe, m.abs() * ((1 + u) * (1 + c) / torch.where(safe, low, 1.0) - 1 / n),
                      torch.full_like(n, math.inf))
    return Expected(m / n, err)


# -- forward -----------------------------------------------------------------------------------

def dora_expected(
    base: torch.nn.Module, tensors: Mapping[str, torch.Tensor], scaling: float, x: torch.Tensor, *,
    keep: torch.Tensor | None = None, training: bool | None = None,
) -> Expected:
    """Expected output of a DoRA layer over ``base`` (unmerged, one adapter), and its bound (``dora_stack_expected``
    with one adapter)."""
    return dora_stack_expected(base, [(tensors, scaling)], x, keeps=[keep], training=training)


def dora_stack_expected(
    base: torch.nn.Module, adapters: Sequence[tuple[Mapping[str, torch.Tensor], float]], x: torch.Tensor, *,
    keeps: Sequence[torch.Tensor | None] | None = None, training: bool | None = None,
) -> Expected:
    """Expected output of a DoRA layer over ``base`` with ``adapters`` ((tensors, scaling) each) active in this order,
    unmerged, and its bound.

    PEFT composes several active adapters in sequence (``bnb.py`` forward passes the running ``result`` on as
    ``base_result``): without dropout each adapter's base term is the output so far minus the bias, so
    ``y_k = f_k (y_{k-1} - bias) + bias + f_k s_k B_k A_k x``, the same composition its merge makes
    (``f_2 (f_1 (W0 + d_1) + d_2)``); with an active dropout in train mode the base term is ``W0 d(x)`` for each.

    The steps bounded for each adapter, in PEFT's order (``DoraLinearLayer.forward``), with ``t`` the adapter dtype,
    ``o`` the input/output dtype and ``u_w`` the coarser unit roundoff of the two: ``y0 = base(x)``
    (``expected.linear_expected``: every bitsandbytes path); ``x_t = x.to(t)``; with dropout ``x_d = x_t * keep``
    (two roundings in ``t``: the multiplier ``1/(1-p)`` and the product) else ``x_d = x_t``; the base term
    ``T = y - bias`` (no dropout / eval; one rounding in ``u_w``) or ``T = x_d W0^T`` in ``t`` (``W0`` dequantized,
    float32, cast to ``t``); ``f`` (``norm_expected`` and ``factor_expected`` in ``t``); ``z = B (A x_d)`` in ``t``;
    ``extra = (f - 1) T + (f z) s``; ``y = y + extra``, cast to ``o`` (PEFT casts after each adapter).
    """
    o = x.dtype
    xv = x.detach().double().cpu()
    w0 = qlayers.dequantize(base).double().cpu()
    y = linear_expected(base, xv, o, training=training)
    bias = getattr(base, "bias", None)
    keeps = [None] * len(adapters) if keeps is None else list(keeps)
    for (tensors, scaling), keep in zip(adapters, keeps, strict=True):
        t = tensors["lora_A.weight"].dtype
        u_t = qbounds.unit_roundoff(t)
        u_w = max(u_t, qbounds.unit_roundoff(o))
        a, b, _ = lora_tensors(tensors)
        x_t = Expected(xv, cast_error(o, t) * xv.abs())
        if keep is None:
            x_d = x_t
            if bias is None:
                term = y
            else:
                bv = bias.detach().double().cpu()
                term = _add(y, Expected(-bv, max(cast_error(bias.dtype, t), cast_error(bias.dtype, o)) * bv.abs()),
                            u_w)
        else:
            kv = keep.detach().double().cpu()
            # nn.Dropout: the multiplier 1/(1-p) rounded to t, then the product rounded: two roundings
            x_d = _round(_round(Expected(x_t.value * kv, x_t.bound * kv.abs()), u_t), u_t)
            term = _matmul(x_d, w0, t)  # matmul_rounding_bound counts the float32 weight's rounding to t
        f = factor_expected(tensors[MAGNITUDE], norm_expected(w0, tensors, scaling, t), t)
        f = Expected(f.value.expand_as(y.value), f.bound.expand_as(y.value))
        z = _matmul(_matmul(x_d, a, t), b, t)
        extra = _add(_mul(_add(f, _const(-1.0, f.value), u_t), term, u_w),
                     _mul(_mul(f, z, u_t), _const(scaling, z.value), u_t), u_w)
        y = _round(_add(y, extra, u_w), cast_error(torch.promote_types(t, o), o))
    return y


# -- merge and unmerge ---------------------------------------------------------------------------

def dora_merge_error(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float, *,
                     w_err: torch.Tensor | None = None, norm_on: torch.Tensor | None = None,
                     norm_err: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Expected]:
    """(exact merged weight ``f (W0 + s B A)``, bound on forming it in float32, the factor ``f`` with its bound).

    As PEFT's ``merge_safe`` computes it on a float32 dequantized ``W0``: ``delta = (B @ A) * s`` in the adapter
    dtype (``lora_delta_error``, then cast to float32); ``v_hat = fl(W0_hat + delta)`` (``e_v = e_w + e_delta + u32
    (|v| + e_w + e_delta)``); the norm and ``f_hat = fl(m / n_hat)`` in float32 (``norm_expected``,
    ``factor_expected``); ``fl(f_hat v_hat)``: ``|f| e_v + e_f |v| + e_f e_v`` plus one rounding. Requantization
    excluded (add ``weight_bound``).

    ``w_err``: ``W0`` is known within it (None: exactly). ``norm_on``/``norm_err``: the weight the norm is taken on
    and its error, when it is not ``W0`` (a DoRA merge into a weight that already holds merged adapters scales that
    weight but takes its norm on the unmerged base the forward reads; default ``W0`` and ``w_err``)."""
    a, b, _ = lora_tensors(tensors)
    w = w0.double().cpu()
    delta = scaling * (b @ a)
    e_d = lora_delta_error(tensors, scaling)
    e_d = e_d + cast_error(tensors["lora_A.weight"].dtype, torch.float32) * (delta.abs() + e_d)
    e_in = e_d if w_err is None else e_d + w_err.double().cpu()
    v = _round(Expected(w + delta, e_in), U32)
    norm_w, norm_e = (w, w_err) if norm_on is None else (norm_on, norm_err)
    f = factor_expected(tensors[MAGNITUDE], norm_expected(norm_w, tensors, scaling, torch.float32, w0_err=norm_e),
                        torch.float32)
    merged = _mul(Expected(f.value[:, None].expand_as(w), f.bound[:, None].expand_as(w)), v, U32)
    return merged.value, merged.bound, f


def dora_roundtrip_bound(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], scaling: float, f: Expected,
                         wb1: torch.Tensor, wb2: torch.Tensor) -> torch.Tensor:
    """Bound on ``|W2 - W0|`` after merge then unmerge, both requantized (``wb1``, ``wb2``: ``weight_bound`` of the
    layer after each), when the unmerge divides by the very ``f_hat`` and subtracts the very ``delta_hat`` the merge
    used (PEFT keeps the merge's norm; the reference too). All in float32:

    ``v_hat = (W0 + d)(1 + a1)``, ``W1 = f_hat v_hat (1 + a2) + q1`` (``|q1| <= wb1``), ``U = (W1 / f_hat)(1 + a3)``,
    ``W2' = (U - d)(1 + a4)``, ``|a_i| <= u32``, ``d`` = delta_hat. Then ``U - d = W0 + (W0 + d)((1 + a1)(1 + a2)(1 +
    a3) - 1) + q1 (1 + a3) / f_hat``, so ``|U - d - W0| <= D = (|W0| + |delta| + e_delta)((1 + u)^3 - 1) + wb1 (1 +
    u) / (|f| - e_f)``; ``|W2' - W0| <= D + u (|W0| + D)``; ``W2 = Q(W2')`` adds ``wb2``. Infinite where
    ``|f| <= e_f``."""
    a, b, _ = lora_tensors(tensors)
    w = w0.double().cpu()
    delta = (scaling * (b @ a)).abs()
    e_d = lora_delta_error(tensors, scaling)
    f_low = (f.value.abs() - f.bound)[:, None]
    safe = f_low > 0
    spread = torch.where(safe, wb1.double().cpu() * (1 + U32) / torch.where(safe, f_low, 1.0), math.inf)
    d = (w.abs() + delta + e_d) * ((1 + U32) ** 3 - 1) + spread
    return d + U32 * (w.abs() + d) + wb2.double().cpu()


# -- gradients ---------------------------------------------------------------------------------

DORA_STORE_ROUNDINGS = 20
"""Values rounded (stored or cast) along the longest path of one term of the output or a gradient, forward plus
backward, in the implementation's dtypes (PEFT's order). Forward, base branch: ``x`` cast to the compute dtype (1),
``x W^T`` stored (2), bias add (3), cast to the input dtype (4), ``- bias`` (5), ``(f - 1)`` (6), times the base term
(7), ``+`` the low-rank term (8), ``+ y0`` (9), cast to the output dtype (10); low-rank branch: ``x`` cast to the
adapter dtype, dropout scale, ``A x`` stored, ``B (.)`` stored, ``f *``, ``* s``, ``+``, ``+ y0``, cast (9).
Backward, the longest (``dL/dx`` through the base): the output gradient cast (1), through the final cast (2), times
``(f - 1)`` (3), cast to the base output dtype (4), cast to the compute dtype (5), ``g W`` stored (6), cast to the
input dtype (7), the sum with the direct base path (8), with the low-rank path (9), the low-rank path's own
``* s``/``* f``/``B^T``/``A^T``/cast into it (up to 10 in all). ``10 + 10``; a term of a gradient also carries the
forward values it multiplies, which lie on the same path and are counted there."""


def _dora_graph(leaves: Mapping[str, torch.Tensor], x: torch.Tensor, keep: torch.Tensor | None, scaling: float,
                inv_n: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """DoRA's output with the norm a constant ``inv_n = 1/n`` (signed), or the same graph on magnitudes."""
    w, a, b, m = leaves["W"], leaves["lora_A.weight"], leaves["lora_B.weight"], leaves[MAGNITUDE]
    xd = x if keep is None else x * keep
    f = m * inv_n
    base = x @ w.t()
    term = base if keep is None else xd @ w.t()
    lora = abs(scaling) * ((xd @ a.t()) @ b.t()) if magnitude else scaling * ((xd @ a.t()) @ b.t())
    y = base + ((f + 1) if magnitude else (f - 1)) * term + f * lora
    return y + leaves["b"] if "b" in leaves else y


@dataclass
class DoraGradExpected:
    """Float64 output and gradients (norm detached) with componentwise bounds."""

    y: torch.Tensor
    y_bound: torch.Tensor
    grads: dict[str, torch.Tensor]
    grad_bounds: dict[str, torch.Tensor]


def dora_grad_expected(
    w0: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], scaling: float,
    x: torch.Tensor, g: torch.Tensor, *, compute_dtype: torch.dtype, keep: torch.Tensor | None = None,
    weight_rel: float = 0.0, x_err: torch.Tensor | None = None,
) -> DoraGradExpected:
    """Output and gradients of ``L = sum(y * g)`` with the norm detached, and their bounds.

    The ``conformance.numerics.grads`` model: every output and gradient is a sum of products of the leaves
    (``x, W0, b, A, B, m, 1/n, g``); the same graph on absolute values with every sign + gives ``M``, the sum of the
    terms' magnitudes. Each term passes at most ``n_acc = in + out + r + rows`` accumulations (at least float32)
    and ``DORA_STORE_ROUNDINGS`` roundings in the coarsest dtype ``c`` of the computation (the adapter, compute
    and input dtypes: pass the coarsest), so the rounding is at most ``rho M`` with ``rho = (1 + gamma_nacc(u_acc))
    (1 + gamma_K(u_c)) - 1``. Leaf errors enter as ``M(|leaf| + E) - M(|leaf|)`` (monotone: nonnegative
    coefficients): ``W0`` within ``weight_rel |W0|`` (the kernel's weight vs ``dequantize``'s:
    ``grads.WEIGHT_F32_ROUNDINGS`` and the storage rounding, as the caller derives it), the bias within ``u_c |b|``,
    ``1/n`` within ``(1 + u)/(n - E_n) - 1/n`` (``norm_expected`` in the adapter dtype, the division's rounding),
    ``x`` within ``x_err`` where given (the int8-quantized base input of bitsandbytes' CUDA path, entered at ``x`` as
    ``conformance.numerics.grads`` does for LoRA).
    """
    a_dtype = tensors["lora_A.weight"].dtype
    u_c = qbounds.unit_roundoff(compute_dtype)
    w = w0.double().cpu()
    x64, g64 = x.detach().double().cpu(), g.detach().double().cpu()
    kv = None if keep is None else keep.detach().double().cpu()
    leaves = {"W": w, **{k: tensors[k].detach().double().cpu() for k in ("lora_A.weight", "lora_B.weight", MAGNITUDE)}}
    if bias is not None:
        leaves["b"] = bias.double().cpu()
    norm = norm_expected(w, tensors, scaling, a_dtype)
    inv_n = 1 / norm.value
    low = norm.value - norm.bound
    u_a = qbounds.unit_roundoff(a_dtype)
    inv_big = torch.where(low > 0, (1 + u_a) / torch.where(low > 0, low, 1.0), math.inf)
    errs = {"W": weight_rel * w.abs(), **({"b": u_c * leaves["b"].abs()} if bias is not None else {})}
    grad_keys = ["lora_A.weight", "lora_B.weight", MAGNITUDE]

    def run(vals: Mapping[str, torch.Tensor], xv: torch.Tensor, gv: torch.Tensor, inv: torch.Tensor,
            magnitude: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lv = {k: v.detach().clone().requires_grad_(k in grad_keys) for k, v in vals.items()}
        xr = xv.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = _dora_graph(lv, xr, None if kv is None else (kv.abs() if magnitude else kv), scaling, inv, magnitude)
            gs = torch.autograd.grad((y * gv).sum(), [xr, *(lv[k] for k in grad_keys)])
        return y.detach(), dict(zip(["x", *grad_keys], (t.detach() for t in gs)))

    y, grads = run(leaves, x64, g64, inv_n, False)
    small = {k: v.abs() for k, v in leaves.items()}
    big = {k: v.abs() + errs.get(k, 0) for k, v in leaves.items()}
    y_s, m_s = run(small, x64.abs(), g64.abs(), inv_n, True)
    x_big = x64.abs() if x_err is None else x64.abs() + x_err.double().cpu()
    y_b, m_b = run(big, x_big, g64.abs(), inv_big, True)
    rows = max(1, x64.numel() // x64.shape[-1])
    n_acc = x64.shape[-1] + w.shape[0] + tensors["lora_A.weight"].shape[0] + rows
    u_acc = min(u_c, U32)
    rho = (1 + qbounds.gamma(n_acc, u_acc)) * (1 + qbounds.gamma(DORA_STORE_ROUNDINGS, u_c)) - 1
    rho += qbounds.gamma(n_acc + DORA_STORE_ROUNDINGS, qbounds.unit_roundoff(torch.float64))  # the oracle's own

    def bound(big_: torch.Tensor, small_: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num((big_ - small_) + rho * big_, nan=math.inf)

    return DoraGradExpected(y, bound(y_b, y_s), grads, {k: bound(m_b[k], m_s[k]) for k in grads})
