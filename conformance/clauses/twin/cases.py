"""The twin area's cases: its bases, the trained-like adapter values, and the dense twin itself.

``params(method)`` is the method table's minimal config (``conformance.core.methods``). ``perturb`` moves every
trainable adapter tensor away from its initial value (most methods start at the identity, where a forward or a merge
that ignores the adapter passes). ``Twin`` builds the dense twin: the implementation's own ``create`` over a plain
``nn.Linear`` holding the dequantized base weight (float64), then the quantized layer's adapter tensors copied in
(``adapter_parameters``: the same names on both bases, what ``dense_twin`` promises) and what the rule needs from it
(``numerics.twin``: the linear map, or the transforms ``S`` and ``T``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance.clauses import cases
from conformance.clauses.interface import AdapterSpec
from conformance.core.methods import TwinRule, row
from conformance.numerics import twin as ntwin
from conformance.numerics.rounding import U32, gamma_n
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_name

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

NAME = "default"
#: the bases of the clauses that are not tiered: a plain one, one that differs in every axis it can, and a square one
#: (a method may handle square layers only, or those alone); every 4-bit one has in_features a multiple of its
#: blocksize, as merges need on the CPU (``cases.base_invalid(merges=True)``: bitsandbytes 0.50.2's CPU
#: dequantize_4bit)
BASES: dict[int, tuple[cases.BaseCase, ...]] = {
    4: (cases.BaseCase(4), cases.BaseCase(4, in_features=96, out_features=64, quant_type="fp4", double_quant=True,
                                          blocksize=32, compute_dtype=torch.bfloat16),
        cases.BaseCase(4, in_features=64, out_features=64, blocksize=32)),
    8: (cases.BaseCase(8), cases.BaseCase(8, in_features=48, out_features=64, threshold=6.0),
        cases.BaseCase(8, in_features=64, out_features=64)),
}
#: the spread of the perturbation, relative to the tensor's largest entry (or to 1/sqrt(in_features) for a tensor
#: that starts at zero): trained adapters move by a fraction of their scale
SPREAD = 0.25
INPUT_ROWS = 3


def params(method: str) -> dict[str, Any]:
    return dict(row(method).config)


def trainable(layer: nn.Module, name: str = NAME) -> dict[str, torch.Tensor]:
    """The adapter tensors that train (``requires_grad``) and are floating point."""
    return {k: t for k, t in layer.adapter_parameters(name).items()
            if t.requires_grad and t.is_floating_point()}


def perturb(layer: nn.Module, gen: torch.Generator, name: str = NAME) -> None:
    """Move every trainable adapter tensor by ``SPREAD`` of its scale (seeded by ``gen``)."""
    fan = getattr(layer, "in_features", None) or 64
    with torch.no_grad():
        for _, t in sorted(trainable(layer, name).items()):
            scale = float(t.detach().abs().max()) if t.numel() else 0.0
            scale = scale if scale > 0 else 1 / math.sqrt(fan)
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            t.add_((SPREAD * scale * noise).to(t.dtype).to(t.device))


def dense_base(base: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Linear:
    """A plain ``nn.Linear`` with ``base``'s dequantized weight and its bias, in ``dtype``."""
    w = qlayers.dequantize(base).double()
    bias = getattr(base, "bias", None)
    dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.detach().double().cpu().to(dtype))
    return dense


@dataclass
class Twin:
    """The dense twin of ``layer`` (built by ``Twin.of``), and what its rule reads off it (lazily)."""

    method: str
    layer: nn.Module
    dense: nn.Module
    adapter_dtype: torch.dtype
    ctx: Any = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: CheckContext, layer: nn.Module, method: str, label: str) -> Twin:
        dtype = next(iter(layer.adapter_parameters(NAME).values())).dtype
        twin = cls(method, layer, _build(ctx, layer, method, torch.float64, label), dtype, ctx)
        return twin

    @property
    def rule(self) -> TwinRule:
        return row(self.method).rule

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.dense(x.detach().double().cpu())

    @property
    def map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)``: the twin's linear map (``numerics.twin.linear_map``)."""
        if "map" not in self._cache:
            self.dense.eval()
            self._cache["map"] = ntwin.linear_map(self, self.dense.in_features)
        return self._cache["map"]

    @property
    def delta(self) -> torch.Tensor:
        """The twin's effective delta ``M - W0``."""
        return self.map[0] - self.dense.base_layer.weight.detach().double()

    @property
    def transforms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(S, T, |S_d - S|, |T_d - T|)``: the transforms in float64 and how far the dense path's own, in the
        adapter dtype, is from them."""
        if "tr" not in self._cache:
            s, t = ntwin.transforms(self.dense)
            low = _build(self.ctx, self.layer, self.method, self.adapter_dtype, "the twin in the adapter dtype")
            s_d, t_d = ntwin.transforms(low)
            self._cache["tr"] = (s, t, (s_d - s).abs(), (t_d - t).abs())
        return self._cache["tr"]

    def expected(self, x: torch.Tensor, training: bool) -> Any:
        """The quantized layer's expected output for ``x`` (``numerics.twin``, by rule)."""
        self.dense.eval()
        base = self.layer.base_layer
        if self.rule is TwinRule.ADDITIVE:
            with torch.no_grad():
                twin_base = self.dense.base_layer(x.detach().double().cpu())
            return ntwin.additive_expected(base, x, self(x), twin_base, self.delta, self.adapter_dtype,
                                           training=training)
        s, t, se, te = self.transforms
        return ntwin.transform_expected(base, x, s, t, se, te, self.adapter_dtype, training=training)

    def grad_expected(self, g: torch.Tensor, x_dtype: torch.dtype) -> Any:
        m = self.map[0]
        base = self.layer.base_layer
        if self.rule is TwinRule.ADDITIVE:
            return ntwin.input_grad_expected(base, g, x_dtype, m, self.adapter_dtype)
        s, t, se, te = self.transforms
        return ntwin.transform_grad_expected(base, g, x_dtype, m, s, t, se, te, self.adapter_dtype)

    def merge_error(self, w0: torch.Tensor) -> torch.Tensor:
        """Bound on the merge arithmetic's rounding (before requantization), from the rule: additive, the delta's
        chain and the add in float32; transform, ``S W0 T^T`` formed in the adapter dtype and the transforms' own
        rounding."""
        d = self.adapter_dtype
        if self.rule is TwinRule.ADDITIVE:
            dw = self.delta.abs()
            n = ntwin.chain_length(dw.shape[1], dw.shape[0])
            return gamma_n(n, d) * dw + U32 * (w0.abs() + dw) * (1 + gamma_n(n, d))
        s, t, se, te = self.transforms
        mag = s.abs() @ w0.abs() @ t.abs().t()
        k = ntwin.nnz(s, 1) + ntwin.nnz(t, 1)
        return (gamma_n(k, d) + U32) * mag + se @ w0.abs() @ t.abs().t() + s.abs() @ w0.abs() @ te.t()


def _build(ctx: CheckContext, layer: nn.Module, method: str, dtype: torch.dtype, label: str) -> nn.Module:
    """The implementation's layer over a dense base in ``dtype`` with ``layer``'s adapter tensors copied in."""
    dense = dense_base(layer.base_layer, dtype)
    spec = AdapterSpec(method=method, adapter_name=NAME, params=params(method), dtype=dtype_name(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(ctx.seed)
        try:
            twin = ctx.impl.create(dense, spec)
        except Exception as exc:  # the implementation's: dense_twin promises this works
            ctx.fail(f"{label}: the dense twin does not build (create over nn.Linear, {dtype_name(dtype)}): "
                     f"{type(exc).__name__}: {exc}")
    src, dst = layer.adapter_parameters(NAME), twin.adapter_parameters(NAME)
    if set(src) != set(dst):
        ctx.fail(f"{label}: adapter_parameters differ between the quantized layer ({sorted(src)}) and its dense twin "
                 f"({sorted(dst)}); dense_twin promises the same names")
    with torch.no_grad():
        for k, t in src.items():
            if tuple(dst[k].shape) != tuple(t.shape):
                ctx.fail(f"{label}: adapter tensor {k} is {tuple(t.shape)} on the quantized layer and "
                         f"{tuple(dst[k].shape)} on the dense twin")
            dst[k].data = t.detach().cpu().to(dtype).clone() if t.is_floating_point() else t.detach().cpu().clone()
    return twin.eval()
