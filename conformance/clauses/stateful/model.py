"""Float64 model of an adapter layer's logical state, run beside the layer by the state machine.

The model holds what the layer *should* be: the dequantized base weights and bias (float64, exactly
what the base layer stores now), the adapters (their tensors, copied bit for bit in their dtype),
which adapters are active / merged, whether adapters are disabled and the train/eval mode. It
gives, for an input, the expected output and its analytic bound (``conformance.numerics``:
``weight_bound``/``matmul_rounding_bound`` based, never a magic tolerance).

Merges and unmerges are *requantizations* (PEFT's ``peft/tuners/lora/bnb.py``: dequantize -> apply -> requantize
with the original settings). The model tracks three chains of "exact value, bound on how far the
stored weight may be from it" (:class:`Chain`):

- ``step``: starts from the stored weights right before one ``merge()``/``unmerge()`` call; it
  checks that call (clause STATE-MERGE-MATCHES-MODEL). A call that merges k adapters
  requantizes k times; the k-1 intermediate states are not observable, so their requantization
  bound is computed from the exact intermediate weights (:func:`requant_bound_from_exact`);
- ``anchor``: starts from the stored weights when the merged stack was last empty; after the
  stack is unmerged again, the weights must be back within its bound (STATE-UNMERGE-RESTORES);
- ``orig``: starts at the weights the layer was built with; its bound is the sum over every
  requantization so far of that requantization's bound, propagated through the later merges
  (the "k x single-cycle" drift bound, STATE-DRIFT-BOUNDED).

After each call the model's weights become the *actual* dequantized weights, so the output
bound of every forward is per step (it does not grow with the number of merges).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import bitsandbytes as bnb  # noqa: F401  (quant_state types)
import torch
from torch import nn

from conformance import numerics
from conformance.numerics.expected import lora_tensors
from conformance.numerics.ratio import stored_vs_exact as _ratio
from conformance.numerics.requant import requant_bound_from_exact
from conformance.numerics.rounding import U32
from conformance.quant import bounds as qbounds

__all__ = ["AdapterModel", "Chain", "LogicalModel", "_ratio", "apply_op", "cast_chain", "copy_tensors",
           "requant_bound_from_exact"]


def _u(dtype: torch.dtype) -> float:
    return 0.0 if dtype == torch.float64 else qbounds.unit_roundoff(dtype)


@dataclass
class AdapterModel:
    """One adapter as the model knows it: method, constructor parameters, tensors (bit copies)."""

    method: str
    params: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def t64(self) -> dict[str, torch.Tensor]:
        return {k: v.double() for k, v in self.tensors.items()}


def copy_tensors(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bit copies (on the CPU, same dtype) of an adapter's tensors."""
    return {k: v.detach().cpu().clone() for k, v in params.items()}


@dataclass
class Chain:
    """Exact float64 weights ``w``/``b`` and bounds ``ew``/``eb`` on |stored - exact|.

    ``factors``: per merged DoRA adapter, the factor ``f = m / ||W + s B A||_c`` its merge took on this chain's
    weights (value, and the bound on the factor the implementation computed from the stored weights): the unmerge
    divides by that very factor (PEFT caches the norm, ``<adapter>-weight_norm``)."""

    w: torch.Tensor
    ew: torch.Tensor
    b: torch.Tensor | None
    eb: torch.Tensor | None
    factors: dict[str, numerics.Expected] = field(default_factory=dict)

    @classmethod
    def start(cls, w: torch.Tensor, b: torch.Tensor | None) -> Chain:
        return cls(w.clone(), torch.zeros_like(w), None if b is None else b.clone(),
                   None if b is None else torch.zeros_like(b))

    def ratio(self, w_actual: torch.Tensor, b_actual: torch.Tensor | None) -> tuple[float, str]:
        """max |actual - exact| / bound, and where the worst element is."""
        return _ratio(w_actual, self.w, self.ew, "weight", b_actual, self.b, self.eb)


# -- one merge / unmerge operation on a chain ---------------------------------------------------

def _lora_op(chain: Chain, w_in: torch.Tensor, w_in_err: torch.Tensor | None, adapter: AdapterModel, sign: int,
             u_bias: float) -> Chain:
    t = adapter.tensors
    s = numerics.lora_scaling(adapter.params)
    delta = numerics.lora_delta(t, s)
    # the delta formed in the adapter dtype and added to the float32 weights: the merge clauses' bound
    w = chain.w + sign * delta
    ew = chain.ew + numerics.lora_merge_error(w_in, t, sign * s, w_in_err)
    b, eb = chain.b, chain.eb
    bb = t.get("lora_B.bias")
    if bb is not None and b is not None:
        sb = s * bb.double()
        b = b + sign * sb
        b_in = chain.b.abs() + chain.eb
        eb = eb + (_u(bb.dtype) + 2 * U32) * sb.abs() + U32 * (b_in + sb.abs()) \
            + u_bias * (b_in + sb.abs()) * (1 + 3 * U32)
    return Chain(w, ew, b, eb, dict(chain.factors))


def _dora_op(chain: Chain, name: str, adapter: AdapterModel, sign: int) -> Chain:
    """One DoRA merge (sign +1) or unmerge (-1) of adapter ``name`` on ``chain``, before requantization (PEFT 0.21.2
    ``DoraLinearVariant.merge_safe``/``unmerge``, peft/tuners/lora/variants.py; the reference alike), in float32 on
    the dequantized weight ``S``, which lies within ``chain.ew`` of ``chain.w``:

    - merge: ``d_hat = s B A`` in the adapter dtype (``lora_delta_error``, cast to float32); the norm of ``S + d_hat``
      and ``f_hat = fl(m / n_hat)`` in float32 (``numerics.dora.norm_expected`` with ``w0_err = chain.ew``: the norm
      of the stored weights is within ``||ew_row||`` of the exact weights' norm, then ``factor_expected``);
      ``v_hat = fl(S + d_hat)``: ``e_v = ew + e_d + u32 (|v| + ew + e_d)``; ``fl(f_hat v_hat)``: ``|f| e_v + e_f |v| +
      e_f e_v`` plus one rounding. The exact value is ``f (w + d)`` with ``f`` the factor of the chain's exact
      weights (``numerics.dora.dora_merge_error`` when ``ew`` is 0); ``f`` is kept in ``chain.factors``;
    - unmerge: ``fl(fl(S / f_hat) - d_hat)`` with the kept ``f_hat`` (the merge's cached norm): ``|S / f_hat - w / f|
      <= ew / (|f| - e_f) + |w| e_f / (|f| (|f| - e_f))``, one rounding, minus ``d_hat`` (``e_d``), one rounding. A
      merge then unmerge is exact in the chain (``f (w + d) / f - d = w``); the bound is the two steps' sum, which
      holds ``numerics.dora.dora_roundtrip_bound``'s terms and the factor's error, which that bound cancels (it
      knows the same ``f_hat`` divides), times ``|w|``: ``O(gamma_n u |w|)``, far below a requantization.

    The bias is left alone: DoRA scales the weight only, and PEFT refuses ``lora_bias`` with DoRA."""
    from conformance.numerics import dora as ndora

    t = adapter.tensors
    s = numerics.lora_scaling(adapter.params)
    a, b, _ = lora_tensors(t)
    delta = s * (b @ a)
    e_d = numerics.lora_delta_error(t, s)
    e_d = e_d + numerics.cast_error(t["lora_A.weight"].dtype, torch.float32) * (delta.abs() + e_d)
    factors = dict(chain.factors)
    if sign > 0:
        w, ew, f = ndora.dora_merge_error(chain.w, t, s, w_err=chain.ew)
        factors[name] = f
    else:
        if name not in factors:
            raise KeyError(f"the model unmerges DoRA adapter {name!r} without the factor of its merge")
        f = factors.pop(name)
        fv, fe = f.value[:, None], f.bound[:, None]
        low = fv.abs() - fe
        safe = low > 0
        low = torch.where(safe, low, 1.0)
        q = chain.w / fv
        e_q = torch.where(safe, chain.ew / low + chain.w.abs() * fe / (fv.abs() * low), math.inf)
        e_q = e_q + U32 * (q.abs() + e_q)
        w = q - delta
        ew = e_q + e_d + U32 * (w.abs() + e_q + e_d)
    return Chain(w, ew, chain.b, chain.eb, factors)


def _oft_op(chain: Chain, w_in: torch.Tensor, w_in_err: torch.Tensor | None, adapter: AdapterModel, sign: int,
            in_features: int) -> Chain:
    t = adapter.t64()
    n_blocks, bs = numerics.oft_layout(in_features, adapter.params)
    r = numerics.oft_rotation(t, n_blocks, bs)
    tens = dict(adapter.tensors)
    if sign > 0:
        # W' = W R^T with the computed rotation: the merge clauses' bound (numerics.oft_merge_error)
        w = chain.w @ r.t()
        ew = chain.ew @ r.t().abs() + numerics.oft_merge_error(w_in, tens, n_blocks, bs, w_in_err)
    else:
        # W = W' R^{-T}: inverse of the computed rotation (numerics.oft_unmerge_error)
        w = chain.w @ r
        ew = chain.ew @ r.abs() + numerics.oft_unmerge_error(w_in, tens, n_blocks, bs, w_in_err)
    return Chain(w, ew, chain.b, chain.eb, dict(chain.factors))


def apply_op(chain: Chain, w_in: torch.Tensor, w_in_err: torch.Tensor | None, adapter: AdapterModel, sign: int,
             base: nn.Module, bias_dtypes: Sequence[torch.dtype] = (), name: str = "") -> Chain:
    """The chain after merging (sign +1) or unmerging (-1) ``adapter``, before requantization.

    The operation computes on weights within ``w_in_err`` of ``w_in``: the stored weights for the first
    operation of a call (``w_in_err`` None: known exactly), the step chain's exact weights and bound for
    later ones (an intermediate state nobody can see). Its float32 arithmetic is bounded as in the merge
    clauses (``numerics.lora_merge_error``, ``oft_merge_error``, ``oft_unmerge_error``); a DoRA adapter (``name``)
    as :func:`_dora_op` (its factor taken on each chain's own weights, ``w_in`` unused).
    ``bias_dtypes``: the dtypes the call may round the new bias to (the coarsest counts); default the
    dtype ``base`` stores its bias in.
    """
    if adapter.method == "dora":
        return _dora_op(chain, name, adapter, sign)
    if adapter.method == "lora":
        bias = getattr(base, "bias", None)
        dtypes = tuple(bias_dtypes) or ((bias.dtype,) if bias is not None else ())
        u_bias = max((_u(dt) for dt in dtypes), default=U32)
        return _lora_op(chain, w_in, w_in_err, adapter, sign, u_bias)
    return _oft_op(chain, w_in, w_in_err, adapter, sign, base.in_features)


def cast_chain(chain: Chain, dtype: torch.dtype) -> Chain:
    """The chain after the stored bias is rounded to ``dtype`` (bitsandbytes' in-place re-typing of an 8-bit
    layer's bias in its forward, ``Linear8bitLt.forward``, bitsandbytes/nn/modules.py).

    Before the cast the stored bias lies in ``[b - eb, b + eb]``; rounding to nearest is monotone, so after
    it the stored bias lies in ``[round(b - eb), round(b + eb)]`` exactly (where ``eb`` is 0, exactly at
    ``round(b)``). The interval's ends are computed in float64 and rounded outwards first (``nextafter``), so
    the image contains every value the cast can give and nothing is added besides. The weights are untouched.
    """
    if chain.b is None or chain.eb is None:
        return chain
    b, eb = chain.b, chain.eb
    exact = eb == 0
    lo = torch.where(exact, b, torch.nextafter(b - eb, torch.full_like(b, -math.inf)))
    hi = torch.where(exact, b, torch.nextafter(b + eb, torch.full_like(b, math.inf)))
    rlo, rhi = lo.to(dtype).double(), hi.to(dtype).double()
    return Chain(chain.w, chain.ew, (rlo + rhi) / 2, (rhi - rlo) / 2, dict(chain.factors))


# -- the model ----------------------------------------------------------------------------------

@dataclass
class LogicalModel:
    """What the layer should be; see the module docstring."""

    in_features: int
    out_features: int
    w: torch.Tensor
    b: torch.Tensor | None
    w_orig: torch.Tensor
    b_orig: torch.Tensor | None
    adapters: dict[str, AdapterModel] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    disabled: bool = False
    training: bool = True
    requantizations: int = 0
    anchor: Chain | None = None
    orig: Chain | None = None
    anchor_w: torch.Tensor | None = None
    anchor_b: torch.Tensor | None = None
    #: the DoRA factors of the merged adapters as the step chain of their merge call took them (on the stored
    #: weights then): the step chain of a later unmerge call divides by them (``Chain.factors``)
    step_factors: dict[str, numerics.Expected] = field(default_factory=dict)

    @classmethod
    def from_base(cls, base: nn.Module) -> LogicalModel:
        w, b = numerics.base_weights(base)
        m = cls(base.in_features, base.out_features, w, b, w.clone(), None if b is None else b.clone())
        m.reset_chains(original=True)
        return m

    def reset_chains(self, *, original: bool = False) -> None:
        self.anchor = Chain.start(self.w, self.b)
        self.anchor_w, self.anchor_b = self.w.clone(), None if self.b is None else self.b.clone()
        if original:
            self.orig = Chain.start(self.w, self.b)

    # -- merge / unmerge -------------------------------------------------------------------
    def run_ops(self, names: Sequence[str], sign: int, base_after: nn.Module,
                bias_dtypes: Sequence[torch.dtype] = (), bias_cast: torch.dtype | None = None,
                standard: nn.Module | None = None) -> dict[str, Chain]:
        """Advance step/anchor/orig chains through len(names) requantizations; the last one's
        bound is read from ``base_after`` (observable), earlier ones from the exact weights.

        ``bias_dtypes``: the dtypes the call may write the bias in (:func:`apply_op`); ``bias_cast``: the
        dtype the bias is rounded to after the call (:func:`cast_chain`; an 8-bit forward's re-typing).
        ``standard``: given when ``base_after`` is in bitsandbytes' CPU packed layout (the forward that unmerged
        repacked it afterwards), a base with the same settings in the standard layout: the last requantization's
        state is then hidden too (its bound comes from the exact weights with ``standard``'s settings, as the
        earlier ones'; a repacked double-quantized layer has lost what ``weight_bound`` reads), and the repack's
        ``quant.bounds.cpu_repack_bound`` is added."""
        settings = base_after if standard is None else standard
        step = Chain.start(self.w, self.b)
        step.factors = dict(self.step_factors)
        chains = {"step": step, "anchor": self.anchor, "orig": self.orig}
        w_in, w_in_err = self.w, None
        for i, name in enumerate(names):
            ad = self.adapters[name]
            chains = {k: apply_op(c, w_in, w_in_err, ad, sign, base_after, bias_dtypes, name)
                      for k, c in chains.items()}
            last = i == len(names) - 1
            s = chains["step"]
            if last and standard is None:
                q = qbounds.weight_bound(base_after).double().cpu()
            else:
                q = requant_bound_from_exact(settings, s.w, s.ew)
                if last:
                    q = q + qbounds.cpu_repack_bound(base_after)
            for c in chains.values():
                c.ew = c.ew + q
            w_in, w_in_err = s.w, s.ew
            self.requantizations += 1
        if bias_cast is not None:
            chains = {k: cast_chain(c, bias_cast) for k, c in chains.items()}
        self.anchor, self.orig = chains["anchor"], chains["orig"]
        self.step_factors = dict(chains["step"].factors)
        return chains

    # -- forward ---------------------------------------------------------------------------
    def expected(self, base: nn.Module, x: torch.Tensor, adapter_names: Sequence[str] | None = None,
                 training: bool | None = None) -> numerics.Expected:
        """Expected output (value, bound) for ``x`` in the current state (merged/disabled aware).

        ``base`` only supplies the base layer's settings (bits, compute dtype, bias dtype, layout); the
        weights are the model's. ``training`` overrides the model's mode for ``numerics.linear_expected``.
        """
        if training is not None:
            return replace(self, training=training).expected(base, x, adapter_names)
        xd = x.detach().cpu()
        use_adapters = not self.disabled and not self.merged
        if not use_adapters:
            return numerics.linear_expected(base, xd.double(), x.dtype, weight=self.w, bias=self.b,
                                          training=self.training)
        rows: list[tuple[list[str], torch.Tensor | None]]
        if adapter_names is None:
            rows = [(list(self.active), None)]
        else:
            groups: dict[str, list[int]] = {}
            for i, n in enumerate(adapter_names):
                groups.setdefault(n, []).append(i)
            rows = [([] if n == "__base__" else [n], torch.tensor(idx)) for n, idx in groups.items()]
        methods = {a.method for a in self.adapters.values()}
        method = methods.pop() if methods else "lora"
        if method == "lora":
            return self._lora_expected(base, xd, rows)
        if method == "dora":
            return self._dora_expected(base, xd, rows)
        return self._oft_expected(base, xd, rows)

    def _dora_expected(self, base, x, rows) -> numerics.Expected:
        """DoRA, unmerged: the active adapters in sequence (``numerics.dora.dora_stack_expected``: PEFT passes the
        running result on as each adapter's base term); no dropout in the machine's variants. ``base`` is the layer's
        own base (the oracle dequantizes it: the model's ``w`` are those weights, ``check_base`` holds them equal)."""
        from conformance.numerics import dora as ndora

        out: numerics.Expected | None = None
        for names, idx in rows:
            xs = x if idx is None else x.index_select(0, idx)
            adapters = [(self.adapters[n].tensors, numerics.lora_scaling(self.adapters[n].params)) for n in names]
            e = ndora.dora_stack_expected(base, adapters, xs, training=self.training)
            if idx is None:
                return e
            if out is None:
                shape = (x.shape[0], *e.value.shape[1:])
                out = numerics.Expected(torch.zeros(shape, dtype=torch.float64),
                                        torch.zeros(shape, dtype=torch.float64))
            out.value.index_copy_(0, idx, e.value)
            out.bound.index_copy_(0, idx, e.bound)
        assert out is not None
        return out

    def _lora_expected(self, base, x, rows) -> numerics.Expected:
        y0 = numerics.linear_expected(base, x.double(), x.dtype, weight=self.w, bias=self.b, training=self.training)
        value, bound = y0.value.clone(), y0.bound.clone()
        mag = y0.value.abs() + y0.bound
        adds = torch.zeros_like(value)
        for names, idx in rows:
            xs = x if idx is None else x.index_select(0, idx)
            pv = torch.zeros_like(value if idx is None else value.index_select(0, idx))
            pb, pm, n_add = torch.zeros_like(pv), torch.zeros_like(pv), 0
            for n in names:
                ad = self.adapters[n]
                p = numerics.lora_path(ad.tensors, numerics.lora_scaling(ad.params), xs, x.dtype)
                pv, pb, pm, n_add = pv + p.value, pb + p.bound, pm + p.value.abs() + p.bound, n_add + 1
            if idx is None:
                value, bound, adds = value + pv, bound + pb, adds + n_add * _u(x.dtype) * (mag + pm)
            else:
                value.index_add_(0, idx, pv)
                bound.index_add_(0, idx, pb)
                adds.index_add_(0, idx, n_add * _u(x.dtype) * (mag.index_select(0, idx) + pm))
        return numerics.Expected(value, bound + adds)

    def _oft_rotate(self, names: Sequence[str], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x R_1 R_2 ... (float64) and the bound on the computed rotated input (in x's dtype)."""
        hv = x.double()
        he = torch.zeros_like(hv)
        for n in names:
            ad = self.adapters[n]
            n_blocks, bs = numerics.oft_layout(self.in_features, ad.params)
            t = ad.tensors
            pdt = t["oft_R.weight"].dtype
            r = numerics.oft_rotation(t, n_blocks, bs)
            delta = numerics.rotation_error(t, bs)
            if pdt in (torch.float16, torch.bfloat16):
                # rotation solved in float32 then rounded to the parameter dtype (PEFT) or in it
                delta = delta + _u(pdt) * math.sqrt(bs)
            m = hv.abs() + he
            # input cast to the parameter dtype (from x's dtype or a previous adapter's)
            e = he @ r.abs() + _u(pdt) * (m @ r.abs())
            e = e + numerics.rotate_error(m * (1 + _u(pdt)), r.abs(), delta, n_blocks, bs, pdt)
            hv = hv @ r
            # cast back to the input dtype (the reference after each adapter, PEFT at the end)
            e = e + _u(x.dtype) * (hv.abs() + e) * (1 + _u(x.dtype))
            he = e
        return hv, he

    def _oft_expected(self, base, x, rows) -> numerics.Expected:
        xv = x.double().clone()
        xe = torch.zeros_like(xv)
        for names, idx in rows:
            if idx is None:
                xv, xe = self._oft_rotate(names, x)
            else:
                hv, he = self._oft_rotate(names, x.index_select(0, idx))
                xv.index_copy_(0, idx, hv)
                xe.index_copy_(0, idx, he)
        return numerics.linear_expected(base, xv, x.dtype, x_err=xe, weight=self.w, bias=self.b,
                                      training=self.training)
