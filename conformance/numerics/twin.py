"""Bounds of a quantized adapter layer against its dense twin (the TWIN-* clauses), one per twin rule.

The dense twin is the same implementation's same method, with the same adapter tensors, over a plain ``nn.Linear``
holding the dequantized base weight, evaluated in float64 (``conformance.clauses.twin.build``). Every method of the
table (``conformance.core.methods.TABLE``) is linear in its input in eval mode without dropout, so the twin is a
linear map ``y = x M^T + c`` that ``linear_map`` reads off it exactly (the identity rows and the zero row as
inputs). What the rules add to it, each derived (no constant is fitted):

- ``additive`` (``y = base(x) + x dW^T``; ``dW = M - W0``, the twin's effective delta): the suite's forward bound of
  the base matmul on the quantized layer (``numerics.expected.base_expected``, every bitsandbytes path), plus the
  rounding of the adapter term in the adapter dtype ``d``: the input's cast to ``d``, a chain of at most
  ``in + min(in, out)`` products and sums plus ``ELEMENTWISE`` elementwise scalings (``chain_length``), each
  relative to ``|x| |dW|^T``, then its cast to the input dtype and the add into the base output (one rounding in the
  input dtype). The chain's magnitude is taken on the effective delta, as the issue's rule says: a method whose
  factors cancel heavily (``|B||A|`` far above ``|BA|``) is covered only as far as ``gamma_n`` in the adapter
  dtype exceeds the rounding such sums really make (float32 adapters: ``gamma_n`` is ``n u``, the worst case; random
  sums round near ``sqrt(n) u``).
- ``transform`` (``y = S base(x T)``): ``S`` and ``T`` read off the twin over probe bases (``transforms``: a zero
  weight with a unit bias gives ``S``'s columns; a zero bias and unit rows of the weight give ``S (x T)``'s slices),
  valid for methods whose ``S`` and ``T`` do not depend on the base weight (the table says which). The input ``x T``
  is formed in ``d`` (cast, a sum over at most the nonzeros of a column of ``T``), the base matmul bound is taken on
  it with that error (``linear_expected(x_err=...)``), ``S`` is applied in ``d`` (a sum over the nonzeros of a row);
  the transforms' own rounding is the dense path's, read off a twin whose adapter is in ``d`` (``|S_d - S|``,
  ``|T_d - T|``), so the quantized layer is judged on what the quantized base adds.

The input gradient (TWIN-BACKWARD) is the transposed map: ``g M`` for ``dL/dy = g``, bounded by the same rules with
bitsandbytes' backward weight (the dequantized weight cast to the compute dtype: ``(u_c + 4 u32) |W|`` as
``numerics.grads`` derives it) and a transposed product in the compute dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers

from .expected import Expected, base_expected, linear_expected
from .rounding import U32, cast_error, gamma_n

#: elementwise scalings an adapter chain may apply besides its products (LoRA's s; VeRA's lambda_d and lambda_b;
#: AdaLoRA's E and 1/ranknum; RandLoRA's lambda and gamma and s): at most four on any path of the table's methods
ELEMENTWISE = 4
#: roundings of the kernel weight against the float32 dequantized one in bitsandbytes' backward (``numerics.grads``:
#: the cast to the compute dtype, and four float32 roundings of the 8-bit dequantization)
BACKWARD_WEIGHT_F32 = 4


def chain_length(in_features: int, out_features: int) -> int:
    """The longest sum an adapter term may round through: ``in`` (x against the first factor), ``min(in, out)``
    (the rank: every method of the table has an inner dimension at most that), plus the elementwise scalings."""
    return in_features + min(in_features, out_features) + ELEMENTWISE


Forward = Callable[[torch.Tensor], torch.Tensor]


def linear_map(fn: Forward, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, c)`` with ``fn(x) = x M^T + c`` for a float64 linear-affine ``fn`` (the twin in eval mode, no grad)."""
    with torch.no_grad():
        eye = torch.eye(in_features, dtype=torch.float64)
        c = fn(torch.zeros(1, in_features, dtype=torch.float64))[0].double()
        m_t = fn(eye).double() - c
    return m_t.t().contiguous(), c


def _dense_base(twin: nn.Module) -> nn.Linear:
    base = twin.base_layer
    if not qlayers.is_dense(base):
        raise TypeError(f"the dense twin's base_layer is {type(base).__name__}, not a torch.nn.Linear")
    return base


def transforms(twin: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, T)`` with ``twin(x) = S base(x T)`` (row inputs: ``x T``, then ``S`` on the output), read off a copy of
    the twin whose base weight and bias are set to probes (the twin itself is left as it was)."""
    probe = copy.deepcopy(twin).eval()
    base = _dense_base(probe)
    n_in, n_out = base.in_features, base.out_features
    dtype = base.weight.dtype
    if base.bias is None:
        base.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype))
    zeros = torch.zeros(1, n_in, dtype=dtype)
    s = torch.empty(n_out, n_out, dtype=torch.float64)
    with torch.no_grad():
        base.weight.zero_()
        for j in range(n_out):
            base.bias.zero_()
            base.bias[j] = 1
            s[:, j] = probe(zeros)[0].double()
        base.bias.zero_()
        t = torch.empty(n_in, n_in, dtype=torch.float64)
        eye = torch.eye(n_in, dtype=dtype)
        for start in range(0, n_in, n_out):
            width = min(n_out, n_in - start)
            base.weight.zero_()
            base.weight[torch.arange(width), start + torch.arange(width)] = 1
            y = probe(eye).double()                                  # rows: S (x T)[start:start+width], zero padded
            t[:, start:start + width] = torch.linalg.solve(s, y.t()).t()[:, :width]
    return s, t


def additive_expected(base: nn.Module, x: torch.Tensor, y_twin: torch.Tensor, twin_base: torch.Tensor,
                      delta: torch.Tensor, adapter_dtype: torch.dtype, *, training: bool | None = None) -> Expected:
    """Expected quantized output ``base(x) + x dW^T`` (the ``additive`` rule): the twin's adapter term ``y_twin -
    twin_base`` (``twin_base``: the twin's base output, ``x W0^T + b``) added to the quantized base's expected output,
    which reads the base as it is stored now (bitsandbytes' CPU repack moves it a little from the twin's ``W0``)."""
    y0 = base_expected(base, x, training=training)
    xv = x.detach().double().cpu()
    a = (y_twin.detach().double().cpu() - twin_base.detach().double().cpu()).reshape(y0.value.shape)
    mag = xv.abs() @ delta.double().cpu().abs().t()
    n = chain_length(delta.shape[1], delta.shape[0])
    e_in = cast_error(x.dtype, adapter_dtype)
    e = e_in * mag + gamma_n(n, adapter_dtype) * mag * (1 + e_in)
    e = e + cast_error(adapter_dtype, x.dtype) * (a.abs() + e)
    add = qbounds.unit_roundoff(x.dtype) * (y0.value.abs() + y0.bound + a.abs() + e)
    return Expected(y0.value + a, y0.bound + e + add)


def nnz(m: torch.Tensor, dim: int) -> int:
    return max(int((m != 0).sum(dim=dim).max()), 1)


def transform_expected(base: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, s_err: torch.Tensor,
                       t_err: torch.Tensor, adapter_dtype: torch.dtype, *, training: bool | None = None) -> Expected:
    """Expected quantized output ``S base(x T)`` (the ``transform`` rule), ``S`` and ``T`` the twin's, the base as it is
    stored now."""
    d = adapter_dtype
    xv = x.detach().double().cpu()
    xt = xv @ t
    mag_t = xv.abs() @ t.abs()
    e_in = cast_error(x.dtype, d)
    e = e_in * mag_t + gamma_n(nnz(t, 0), d) * mag_t * (1 + e_in) + xv.abs() @ t_err
    e = e + cast_error(d, x.dtype) * (xt.abs() + e)
    y1 = linear_expected(base, xt, x.dtype, x_err=e, training=training)
    y1_abs = y1.value.abs() + y1.bound
    mag_s = y1_abs @ s.abs().t()
    e_out = cast_error(x.dtype, d)
    bound = y1.bound @ s.abs().t() + e_out * mag_s + gamma_n(nnz(s, 1), d) * mag_s * (1 + e_out)
    bound = bound + y1_abs @ s_err.t()
    value = y1.value @ s.t()
    bound = bound + cast_error(d, x.dtype) * (value.abs() + bound)
    return Expected(value, bound)


def _base_backward(base: nn.Module, g_abs: torch.Tensor, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(|g| |W|, the rounding bound of bitsandbytes' backward ``g W``): the kernel weight in the compute dtype ``c``
    within ``(u_c + 4 u32) |W|``, the cast of ``g`` to ``c``, a sum of ``out`` products in ``c``, the cast back."""
    w = qlayers.dequantize(base).double().cpu()
    c = x_dtype if qlayers.bits_of(base) == 8 else (getattr(base, "compute_dtype", None) or x_dtype)
    w_err = qbounds.unit_roundoff(c) + BACKWARD_WEIGHT_F32 * U32
    mag = g_abs @ w.abs()
    e_g = cast_error(x_dtype, c)
    rows = g_abs.reshape(-1, w.shape[0])
    e = (e_g + w_err) * mag + qbounds.matmul_rounding_bound(rows, w.abs().t() * (1 + w_err), c).reshape(mag.shape)
    return mag, e + cast_error(c, x_dtype) * (mag + e)


def input_grad_expected(base: nn.Module, g: torch.Tensor, x_dtype: torch.dtype, m: torch.Tensor,
                        adapter_dtype: torch.dtype) -> Expected:
    """Expected ``dL/dx = g M`` of the quantized layer (``dL/dy = g``, ``M`` the twin's map), ``additive`` rule:
    the base's backward ``g W`` (``_base_backward``), the adapter's ``g dW`` with the forward's chain rounding in the
    adapter dtype, and the sum of the two in the input dtype."""
    w = qlayers.dequantize(base).double().cpu()
    gv = g.detach().double().cpu()
    mag_b, eb = _base_backward(base, gv.abs(), x_dtype)
    mag_a = gv.abs() @ (m.double().cpu() - w).abs()
    n = chain_length(w.shape[1], w.shape[0])
    e_a = cast_error(x_dtype, adapter_dtype) * mag_a + gamma_n(n, adapter_dtype) * mag_a
    e_a = e_a + cast_error(adapter_dtype, x_dtype) * (mag_a + e_a)
    bound = eb + e_a + qbounds.unit_roundoff(x_dtype) * (mag_b + eb + mag_a + e_a)
    return Expected(gv @ m.double().cpu(), bound)


def transform_grad_expected(base: nn.Module, g: torch.Tensor, x_dtype: torch.dtype, m: torch.Tensor,
                            s: torch.Tensor, t: torch.Tensor, s_err: torch.Tensor, t_err: torch.Tensor,
                            adapter_dtype: torch.dtype) -> Expected:
    """Expected ``dL/dx = ((g S) W) T^T`` (= ``g M``), ``transform`` rule: ``g S`` in the adapter dtype (its cast,
    a sum over a column's nonzeros of ``S``, ``S``'s own rounding), the base's backward on it, ``T^T`` in the adapter
    dtype, the cast back."""
    d = adapter_dtype
    gv = g.detach().double().cpu()
    mag1 = gv.abs() @ s.abs()
    e1 = cast_error(x_dtype, d) * mag1 + gamma_n(nnz(s, 0), d) * mag1 + gv.abs() @ s_err
    e1 = e1 + cast_error(d, x_dtype) * (mag1 + e1)
    w = qlayers.dequantize(base).double().cpu()
    mag_b, eb = _base_backward(base, mag1 + e1, x_dtype)
    e2 = e1 @ w.abs() + eb
    mag3 = (mag_b + e2) @ t.abs().t()
    e3 = e2 @ t.abs().t() + cast_error(x_dtype, d) * mag3 + gamma_n(nnz(t, 1), d) * mag3
    e3 = e3 + (mag_b + e2) @ t_err.t()
    e3 = e3 + cast_error(d, x_dtype) * (mag3 + e3)
    return Expected(gv @ m.double().cpu(), e3)


def magnitude_grads(twin: nn.Module, x: torch.Tensor, g: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
    """The magnitude graph of the twin's adapter gradients (``numerics.grads``' model, read off the twin): a copy of
    the float64 twin whose base weight, bias and adapter tensors (``adapter_parameters``) are replaced by their
    absolute values, run on ``|x|`` with upstream ``|g|``. For a graph of sums and products (and divisions by positive
    constants), every gradient entry is then the sum of the absolute values of its terms, which bounds what any
    rounding of those terms adds (the additive rule's methods; a Cayley solve or a norm is no such graph)."""
    probe = copy.deepcopy(twin)
    base = _dense_base(probe)
    with torch.no_grad():
        base.weight.abs_()
        if base.bias is not None:
            base.bias.abs_()
        tensors = probe.adapter_parameters("default")
        for t in tensors.values():
            if t.is_floating_point():
                t.abs_()
    for t in tensors.values():
        t.grad = None
    xa = x.detach().double().cpu().abs()
    (probe(xa) * g.detach().double().cpu().abs()).sum().backward()
    return {k: (tensors[k].grad if tensors[k].grad is not None else torch.zeros_like(tensors[k])).detach().double()
            for k in keys}


def adapter_grad_bound(magnitude: torch.Tensor, in_features: int, out_features: int,
                       adapter_dtype: torch.dtype) -> torch.Tensor:
    """Bound on how far an adapter gradient computed in ``adapter_dtype`` is from the float64 twin's: the forward chain
    and the backward chain, each at most ``chain_length`` roundings, on the magnitude graph ``magnitude``."""
    return gamma_n(2 * chain_length(in_features, out_features), adapter_dtype) * magnitude
