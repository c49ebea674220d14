"""The reference's LoRA initializations that read the base weight: PiSSA (full and fast SVD), OLoRA and LoftQ.

The yardstick for the INIT-* clauses (``conformance.core.inits.TABLE``). Every decomposition runs in float64 on the
dequantized base weight (``QuantAdapterLayer.base_weight``); the adapter tensors are stored in float32 and the residual
is computed from the stored values, so ``residual + scaling * B A`` is the original weight up to float64 rounding.
The residual is written back the way a merge writes (``QuantAdapterLayer._write_base``: ``quant.requantize`` with the
base's own settings, or in place over a dense base).

- PiSSA (Meng et al., arXiv:2404.02948; PEFT ``LoraLayer.pissa_init``): ``W = U S V^T``; ``A = sqrt(S_r / s) V_r^T``,
  ``B = U_r sqrt(S_r / s)``, the base becomes ``W - s B A``. ``pissa_niter_N``: the same from ``torch.svd_lowrank``
  with N subspace iterations.
- OLoRA (arXiv:2406.01775; PEFT ``LoraLayer.olora_init``): ``W = Q R``; ``A = R[:r]``, ``B = Q[:, :r]``, the base
  becomes ``W - s B A``.
- LoftQ, one step (arXiv:2310.08659; PEFT ``replace_lora_weights_loftq``): the base stays ``Q`` and ``s B A`` is the
  best rank-r approximation of ``W - dequant(Q)``, from the float weight ``W`` the base was quantized from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conformance.core.inits import Init, InitRule, of_value, row

if TYPE_CHECKING:
    from .lora import LoraLinearQuant


def _split(s_r: torch.Tensor, u_r: torch.Tensor, vh_r: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
    root = (s_r / scaling).clamp_min(0).sqrt()
    return root[:, None] * vh_r, u_r * root[None, :]


def factors(init: Init, value: str, w: torch.Tensor, r: int, scaling: float,
            loftq_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 for ``init`` on the dequantized weight ``w`` (float64, out x in)."""
    if r > min(w.shape):
        raise ValueError(f"init_lora_weights={value!r} needs r <= min(out_features, in_features) = {min(w.shape)}, "
                         f"got r={r}")
    if init is Init.PISSA:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return _split(s[:r], u[:, :r], vh[:r], scaling)
    if init is Init.PISSA_NITER:
        niter = int(value.rpartition("_")[2])
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        return _split(s[:r], u[:, :r], v[:, :r].t(), scaling)
    if init is Init.OLORA:
        q, rr = torch.linalg.qr(w)
        return rr[:r].clone(), q[:, :r].clone()
    if init is Init.LOFTQ:
        if loftq_weight is None:
            raise ValueError("init_lora_weights='loftq' needs the float weight the base was quantized from: pass "
                             "loftq_weight=<tensor out x in>")
        if tuple(loftq_weight.shape) != tuple(w.shape):
            raise ValueError(f"loftq_weight has shape {tuple(loftq_weight.shape)}, the base weight {tuple(w.shape)}")
        u, s, vh = torch.linalg.svd(loftq_weight.detach().double().cpu() - w, full_matrices=False)
        return _split(s[:r], u[:, :r], vh[:r], scaling)
    raise ValueError(f"the reference has no initialization {value!r} (it has pissa, pissa_niter_N, olora, loftq)")


def initialize(layer: LoraLinearQuant, name: str, value: str, loftq_weight: torch.Tensor | None = None) -> None:
    """Initialize adapter ``name`` of ``layer`` with ``value`` (an ``init_lora_weights`` string), writing the
    residual into the base where the initialization's rule says so."""
    init = of_value(value)
    if init is None:
        raise ValueError(f"unknown init_lora_weights {value!r}: True, False, 'pissa', 'pissa_niter_N', 'olora' or "
                         "'loftq'")
    if layer.merged:
        raise ValueError(f"init_lora_weights={value!r} rewrites the base weight: unmerge {layer.merged_adapters} first")
    w = layer.base_weight().detach().double().cpu()
    a_lin, b_lin, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    a, b = factors(init, value, w, a_lin.weight.shape[0], s, loftq_weight)
    with torch.no_grad():
        a_lin.weight.copy_(a.to(a_lin.weight.dtype))
        b_lin.weight.copy_(b.to(b_lin.weight.dtype))
    if row(init).rule is InitRule.RESIDUAL:
        stored = s * (b_lin.weight.detach().double().cpu() @ a_lin.weight.detach().double().cpu())
        layer._write_base(w - stored, None)
