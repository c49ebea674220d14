"""The statistical bound on the mean of many train-mode forwards with dropout (LoRA ``lora_dropout``, OFT
``module_dropout``).

A train-mode forward with dropout is a random variable per output element. In exact arithmetic it is

- LoRA: ``y = base(x) + s * (B A (x * m / (1 - p)) + b_B)`` with ``m_i ~ Bernoulli(1 - p)`` independent
  (``torch.nn.Dropout``, what PEFT v0.21.2 src/peft/tuners/lora/layer.py uses), so ``E[y]`` is the
  dropout-free output and ``y_j`` lies in an interval of width ``|s| / (1 - p) * sum_i |(BA)_ji x_i|``;
- OFT: ``k = int(p * D)`` of the ``D`` rotation blocks, drawn uniformly without replacement, are replaced by the
  identity and nothing is rescaled (PEFT v0.21.2 src/peft/tuners/oft/layer.py ``MultiplicativeDropoutLayer``),
  so with ``c_jb = (W (x R_b - x))_j`` restricted to block ``b``: ``E[y_j] = W x + b + (1 - k/D) sum_b c_jb``
  and ``y_j`` lies in an interval of width ``sum_b |c_jb|``;
- DoRA (``conformance.numerics.dora``: PEFT v0.21.2 src/peft/tuners/lora/variants.py ``DoraLinearVariant.forward``
  computes the magnitude term on the dropped input): ``y = W0 x + b + (f - 1) W0 d(x) + f s B A d(x)`` with
  ``d(x) = x * m / (1 - p)`` (``torch.nn.Dropout``) and ``f = m / ||W0 + s B A||_c`` per output row (the norm does
  not depend on the mask), i.e. ``y_j = (W0 x + b)_j + sum_i c_ji x_i m_i / (1 - p)`` with ``c = (f - 1) W0 + f s
  B A``. So ``E[y] = f (W0 + s B A) x + b``, the dropout-free (eval-mode) output -- the mean of the paper's form
  ``f W0 x + f s B A d(x)`` too, since ``E[d(x)] = x`` -- and ``y_j`` lies in an interval of width
  ``sum_i |c_ji x_i| / (1 - p)``.

The bound (``DropoutMean.bound``): for the mean of ``N`` independent forwards, Hoeffding's inequality gives
``P(|mean - E| >= t) <= 2 exp(-2 N t^2 / L^2)`` per element (range width ``L``); a Bonferroni split of the
false-alarm rate ``alpha`` over the ``K`` elements gives ``t = L * sqrt(ln(2K / alpha) / (2N))``. Each computed
forward differs from its exact value by at most the forward rounding bound (``rounding``, from this package's
error model), so the computed mean differs from ``E`` by at most ``t + rounding`` (plus the float64 summation,
``gamma_N`` in float64) with probability at least ``1 - alpha``.

``FALSE_ALARM`` is ``alpha`` of one mean test; a conformance run makes at most one such test per (clause, method,
bits) family, at most 8 in all, so a correct implementation fails a run's mean tests with probability below
``8e-8`` (< 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conformance.quant import bounds as qbounds

from . import ratio as nratio
from .blocks import block_diagonal, oft_layout
from .cayley import oft_blocks
from .dora import MAGNITUDE, _add, _const, _matmul, _mul, _round, factor_expected, norm_expected
from .expected import Expected, base_expected, base_weights, lora_path, lora_scaling, lora_tensors, oft_expected
from .rounding import cast_error, gamma_n

#: false-alarm rate of one mean test (see the module docstring for the per-run rate)
FALSE_ALARM = 1e-8


def hoeffding_halfwidth(width: torch.Tensor, n: int, alpha: float = FALSE_ALARM) -> torch.Tensor:
    """``t`` per element such that every ``|mean of n - E| < t`` with probability >= ``1 - alpha`` (Hoeffding,
    Bonferroni over ``width.numel()`` elements); ``width`` is the per-element range of one sample."""
    if n < 1:
        raise ValueError(f"the mean of n forwards needs n >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = max(int(width.numel()), 1)
    return width.double() * math.sqrt(math.log(2 * k / alpha) / (2 * n))


@dataclass
class DropoutMean:
    """``value`` = E[one forward] (float64), ``spread`` = range width of one forward in exact arithmetic,
    ``rounding`` = bound on |computed forward - exact forward| for any dropout mask."""

    value: torch.Tensor
    spread: torch.Tensor
    rounding: torch.Tensor

    def bound(self, n: int, alpha: float = FALSE_ALARM) -> torch.Tensor:
        mag = self.value.abs() + self.spread + self.rounding
        return hoeffding_halfwidth(self.spread, n, alpha) + self.rounding + gamma_n(n + 1, torch.float64) * mag

    def ratio(self, mean: torch.Tensor, n: int, alpha: float = FALSE_ALARM) -> float:
        err = (mean.detach().double().cpu().reshape(self.value.shape) - self.value).abs()
        return nratio.max_ratio(err, self.bound(n, alpha))


def lora_dropout_mean(layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor) -> DropoutMean:
    """E and bounds of a train-mode LoRA forward with ``params['lora_dropout'] = p`` (dropout on the input of A,
    in the adapter dtype: ``x * m * (1 / (1 - p))``, two roundings)."""
    p = float(params["lora_dropout"])
    tensors = layer.adapter_parameters(name)
    s = lora_scaling(params)
    a, b, bb = lora_tensors(tensors)
    y0 = base_expected(layer.base_layer, x, training=True)
    xv = x.detach().double().cpu()
    value = y0.value + s * (xv @ a.t() @ b.t() + (0.0 if bb is None else bb))
    ba_abs = (b @ a).abs()
    spread = abs(s) / (1 - p) * (xv.abs() @ ba_abs.t())
    u = qbounds.unit_roundoff(tensors["lora_A.weight"].dtype)
    x_mag = xv.abs() / (1 - p)  # bounds |x * m / (1 - p)| for every mask
    d_x = (2 * u + u * u) * x_mag  # the dropout's own two roundings
    path = lora_path(tensors, s, x_mag * (1 + 3 * u), x.dtype)  # rounding bound is monotone in |x|
    prop = abs(s) * ((d_x @ a.abs().t()) @ b.abs().t()) * (1 + gamma_n(a.shape[1] + b.shape[1] + 2, torch.float64)
                                                           + 4 * u)
    path_abs = abs(s) * ((x_mag @ a.abs().t()) @ b.abs().t() + (0.0 if bb is None else bb.abs()))
    add = qbounds.unit_roundoff(x.dtype) * (y0.value.abs() + y0.bound + path_abs + path.bound + prop)
    return DropoutMean(value, spread, y0.bound + path.bound + prop + add)


def oft_dropout_blocks(params: Mapping[str, Any], in_features: int) -> tuple[int, int]:
    """(D, k): rotation blocks stored and how many of them one train-mode forward replaces by the identity
    (``int(p * D)``; a shared block, ``block_share``, is never dropped)."""
    n_blocks, _ = oft_layout(in_features, params)
    d = 1 if params.get("block_share") else n_blocks
    return d, (0 if d == 1 else int(float(params.get("module_dropout", 0.0)) * d))


def oft_dropout_mean(layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor) -> DropoutMean:
    """E and bounds of a train-mode OFT forward with ``module_dropout = p`` (exact Cayley, no COFT).

    ``rounding`` is the sum of the forward bounds with every block rotated and with none rotated: every term of
    ``linear_expected``/``rotate_error`` is linear or subadditive in the input magnitudes, and a partly rotated
    input is elementwise at most the sum of the two (an identity block rotates exactly)."""
    base = layer.base_layer
    tensors = layer.adapter_parameters(name)
    n_blocks, bs = oft_layout(base.in_features, params)
    d, k = oft_dropout_blocks(params, base.in_features)
    r = block_diagonal(oft_blocks(tensors, bs), n_blocks)
    w, bias = base_weights(base)
    xv = x.detach().double().cpu()
    rows = xv.reshape(-1, xv.shape[-1])
    dx = (rows @ r - rows).reshape(rows.shape[0], n_blocks, bs)
    c = torch.einsum("rkb,jkb->rjk", dx, w.reshape(w.shape[0], n_blocks, bs))  # (rows, out, blocks)
    keep = 1.0 - k / d
    value = rows @ w.t() + (0.0 if bias is None else bias) + keep * c.sum(-1)
    spread = c.abs().sum(-1) if k else torch.zeros_like(value)
    full = oft_expected(layer, name, params, x, training=True)
    plain = base_expected(base, x, training=True)
    shape = full.value.shape
    return DropoutMean(value.reshape(shape), spread.reshape(shape), full.bound + plain.bound)


def dora_dropout_mean(layer: nn.Module, name: str, params: Mapping[str, Any], x: torch.Tensor) -> DropoutMean:
    """E and bounds of a train-mode DoRA forward with ``params['lora_dropout'] = p`` (module docstring: PEFT's
    composition, the magnitude term on the dropped input).

    ``rounding`` follows the steps of ``conformance.numerics.dora.dora_stack_expected`` with dropout (one adapter),
    each evaluated on magnitudes: every value is replaced by a majorant of its absolute value over all masks (the
    dropped input by ``|x| / (1 - p)``, ``W0``, ``A``, ``B`` by their absolute values, ``f`` and ``f - 1`` by theirs,
    a sum by the sum of the absolute values). Every step's bound (``_round``, ``_mul``, ``_add``, ``_matmul``) is
    nondecreasing in the magnitudes and bounds it is given, so the result bounds the rounding of the forward of every
    mask."""
    p = float(params["lora_dropout"])
    tensors = layer.adapter_parameters(name)
    s = lora_scaling(params)
    base = layer.base_layer
    o, t = x.dtype, tensors["lora_A.weight"].dtype
    u_t = qbounds.unit_roundoff(t)
    u_w = max(u_t, qbounds.unit_roundoff(o))
    w0, bias = base_weights(base)
    a, b, _ = lora_tensors(tensors)
    xv = x.detach().double().cpu()
    f = factor_expected(tensors[MAGNITUDE], norm_expected(w0, tensors, s, t), t)
    v = w0 + s * (b @ a)
    value = xv @ (f.value[:, None] * v).t() + (0.0 if bias is None else bias)
    c = (f.value - 1)[:, None] * w0 + f.value[:, None] * (s * (b @ a))
    spread = (xv.abs() @ c.abs().t()) / (1 - p)

    y0 = base_expected(base, x, training=True)
    x_abs = xv.abs()
    x_t = Expected(x_abs, cast_error(o, t) * x_abs)
    keep = 1 / (1 - p)  # the largest multiplier nn.Dropout applies
    x_d = _round(_round(Expected(x_t.value * keep, x_t.bound * keep), u_t), u_t)
    term = _matmul(x_d, w0.abs(), t)
    shape = y0.value.shape
    f_abs = Expected(f.value.abs().expand(shape), f.bound.expand(shape))
    f_m1 = _round(Expected((f.value - 1).abs().expand(shape), f.bound.expand(shape)), u_t)
    z = _matmul(_matmul(x_d, a.abs(), t), b.abs(), t)
    extra = _add(_mul(f_m1, term, u_w), _mul(_mul(f_abs, z, u_t), _const(abs(s), z.value), u_t), u_w)
    y = _round(_add(Expected(y0.value.abs(), y0.bound), extra, u_w), cast_error(torch.promote_types(t, o), o))
    return DropoutMean(value.reshape(shape), spread.reshape(shape), y.bound)


def dropout_mean(layer: nn.Module, method: str, name: str, params: Mapping[str, Any],
                 x: torch.Tensor) -> DropoutMean:
    """E and bounds of a train-mode forward with dropout: ``lora_dropout_mean`` / ``oft_dropout_mean`` /
    ``dora_dropout_mean``."""
    if method == "lora":
        return lora_dropout_mean(layer, name, params, x)
    if method == "oft":
        return oft_dropout_mean(layer, name, params, x)
    if method == "dora":
        return dora_dropout_mean(layer, name, params, x)
    raise ValueError(f"unknown method {method!r}; expected 'lora', 'oft' or 'dora'")
