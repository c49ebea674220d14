"""Roofline floors: what a layer's forward / forward+backward cannot beat.

Two floors, both reported next to every timing:

- **measured floor**: the same GEMMs through ``torch.matmul``/``addmm`` on the dequantized weight plus
  the dequantize kernels, timed in the same run (:func:`floor_fn`). For LoRA it includes the adapter's
  GEMMs with the add and the scaling fused into the GEMM (cuBLAS ``beta=1, alpha=scaling``), and for
  forward+backward a second dequantize (QLoRA does not keep the dequantized weight between forward
  and backward; bitsandbytes' ``MatMul4Bit.backward`` dequantizes again). No weight gradient (frozen
  base), gradients for the adapter and the input. For DoRA it adds the weight norm each forward needs,
  ``n = ||W0 + s B A||_c`` (arXiv:2402.09353 eq. 5; PEFT ``DoraLinearLayer.get_weight_norm``): a dequantize of its
  own (the bnb layer's forward keeps no dequantized weight to read it from; PEFT calls ``dequantize_module_weight``,
  the reference ``quant.dequantize``), ``W0 + s B A`` as one GEMM with ``beta=1`` into that weight, the row norm, and
  the output scaled by ``m / n``; its backward scales the output gradient by ``m / n`` (the norm is detached, so it is
  not recomputed) and reduces the magnitude's gradient ``sum_t g (W0 + s B A) x / n``.
- **peak floor**: ``max(flops / peak FLOP/s, bytes / peak bandwidth)`` with datasheet peaks
  (:data:`GPU_PEAKS`, dense tensor-core rates, no sparsity) and the fewest bytes the operation must
  move (each input read once, each output written once, the packed weight read once per pass).
  An unknown GPU (and the CPU) gets no peak floor. DoRA's norm adds the ``B A`` GEMM to the FLOPs and one more
  read of the packed weight per forward to the bytes (a fused kernel would dequantize, add ``s B A`` and square-sum
  in registers, writing nothing but the ``out``-long norm); its elementwise work is left out as every method's is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from conformance.core.vocabulary import LORA_LIKE

from .cases import BenchCase

BARE_IMPLS = ("bnb", "floor-bare")

#: Datasheet dense peaks: (bf16/fp16 tensor FLOP/s, HBM bytes/s). Keyed by a substring of the CUDA
#: device name, first match wins (so the more specific names come first).
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # H100 SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12, 4.8e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-PCIE-40GB", 312e12, 1.555e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("L40S", 362e12, 0.864e12),
    ("A10G", 70e12, 0.6e12),
)


@dataclass(frozen=True)
class Peak:
    name: str
    flops: float
    bandwidth: float


def peak_for(gpu_name: str | None) -> Peak | None:
    """Datasheet peak of a GPU by its CUDA name; None when unknown (then no peak floor is reported)."""
    if not gpu_name:
        return None
    for key, flops, bw in GPU_PEAKS:
        if key.lower() in gpu_name.lower():
            return Peak(key, flops, bw)
    return None


def _elem(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def weight_bytes(case: BenchCase) -> float:
    """Bytes of the stored base weight that a pass must read (packed weight + statistics)."""
    n = case.in_features * case.out_features
    if case.bits == 8:
        return n + 4 * case.out_features  # int8 + fp32 row absmax (SCB)
    stats = n / 64 * (1 + 4 / 256) if case.double_quant else n / 64 * 4  # blocksize 64
    return n / 2 + stats


def flops(case: BenchCase) -> float:
    """Useful floating-point operations of the case (the GEMMs; elementwise work is not counted)."""
    t, k, n, r = case.tokens, case.in_features, case.out_features, case.rank
    base = 2.0 * t * k * n
    if case.op not in ("fwd", "fwdbwd"):
        return 0.0
    adapter = norm = 0.0
    bare = case.impl in BARE_IMPLS
    if not bare and case.method in LORA_LIKE:
        adapter = 2.0 * t * r * (k + n)  # x A^T, (xA^T) B^T
    elif not bare and case.method == "oft":
        adapter = 2.0 * t * k * 32  # block-diagonal rotation of x (block size 32)
    if not bare and case.method == "dora":
        norm = 2.0 * n * r * k  # W0 + s B A: the (out x r) @ (r x in) GEMM of the weight norm, once per forward
    if case.op == "fwd":
        return base + adapter + norm
    # backward: grad input through W (no weight grad: frozen), and for LoRA dB, d(xA), dA, dx += d(xA) A; DoRA's
    # norm is detached (arXiv:2402.09353 sec. 4.3): not recomputed in the backward
    return 2 * base + (3 if case.method in LORA_LIKE else 2) * adapter + norm


def norm_reads(case: BenchCase) -> int:
    """Extra reads of the packed weight per forward for the method's own use of the weight: DoRA's norm reads it
    once (1), every other method and the bare rows 0."""
    return 1 if case.method == "dora" and case.impl not in BARE_IMPLS and case.op in ("fwd", "fwdbwd") else 0


def min_bytes(case: BenchCase) -> float:
    """Fewest bytes the case must move through device memory."""
    t, k, n = case.tokens, case.in_features, case.out_features
    e = _elem(case.dtype)
    w = weight_bytes(case)
    extra = norm_reads(case) * w  # DoRA: the norm's read of the packed weight (forward only: the norm is detached)
    if case.op == "fwd":
        return t * k * e + w + t * n * e + extra
    if case.op == "fwdbwd":
        # forward: x, W, y; backward: grad y, W again, grad x
        return 2 * (t * k * e + w + t * n * e) + extra
    # merge / unmerge: read the packed weight, write it back (plus the adapter, negligible)
    return 2 * w


def peak_floor_s(case: BenchCase, peak: Peak | None) -> float | None:
    if peak is None or case.op not in ("fwd", "fwdbwd"):
        return None
    return max(flops(case) / peak.flops, min_bytes(case) / peak.bandwidth)


# -- the measured floor ------------------------------------------------------------------------------
def dequantize_fn(base: torch.nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """The dequantize kernel bitsandbytes itself runs for this layer, producing ``dtype``."""
    import bitsandbytes as bnb

    w = base.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:
        qs = w.quant_state

        def deq4() -> torch.Tensor:
            out = bnb.functional.dequantize_4bit(w.data, qs)
            return out if out.dtype == dtype else out.to(dtype)

        return deq4
    from conformance.quant.layers import scb_of

    scb = scb_of(base)

    def deq8() -> torch.Tensor:
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).to(dtype)

    return deq8


def floor_fn(case: BenchCase, base: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor | None,
             lora: tuple[torch.Tensor, torch.Tensor, float] | None,
             magnitude: torch.Tensor | None = None) -> Callable[[], object]:
    """The measured floor of ``case`` as one callable: dequantize + torch GEMMs, nothing else.

    ``lora`` is ``(A, B, scaling)`` (A: r x in, B: out x r) or None for the bare layer; ``magnitude`` (out) makes it
    DoRA's (the module docstring: the weight norm with its own dequantize, the output scaled by ``m / n``). All
    tensors are 2-D views (tokens x features); gradients are computed by hand (no autograd bookkeeping). The
    forward returns ``(y, x A^T)``, forward+backward the input gradient (DoRA: with the magnitude's gradient).
    """
    if magnitude is not None and lora is None:
        raise ValueError("a DoRA floor needs the LoRA factors: pass lora=(A, B, scaling) with the magnitude")
    deq = dequantize_fn(base, x.dtype)
    x2 = x.reshape(-1, x.shape[-1])

    def dora_factor() -> torch.Tensor:
        """``m / ||W0 + s B A||_c`` (out): a dequantize of its own, ``W0 + s B A`` in place, the row norm."""
        a, b, s = lora
        v = deq().addmm_(b, a, alpha=s)
        return magnitude / torch.linalg.vector_norm(v, dim=1)

    @torch.no_grad()
    def forward_parts() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W0 x + s B A x, x A^T, the DoRA factor or None): the output before DoRA's rescaling."""
        w = deq()
        y = torch.matmul(x2, w.t())
        xa = None
        if lora is not None:
            a, b, s = lora
            xa = torch.matmul(x2, a.t())
            y.addmm_(xa, b.t(), alpha=s)
        return y, xa, (dora_factor() if magnitude is not None else None)

    @torch.no_grad()
    def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
        y, xa, f = forward_parts()
        return (y if f is None else y.mul_(f)), xa

    if case.op == "fwd":
        return forward

    g2 = grad.reshape(-1, grad.shape[-1])

    @torch.no_grad()
    def forward_backward() -> object:
        y, xa, f = forward_parts()
        g = g2
        if f is not None:
            g = g2 * f  # the output gradient through the rescaling (the norm is a constant)
            torch.sum(g2 * y, dim=0).mul_(f / magnitude)  # d m = sum_t g (W0 + s B A) x / n, and f / m = 1 / n
            y.mul_(f)  # the output itself
        w = deq()
        gx = torch.matmul(g, w)
        if lora is not None:
            a, b, s = lora
            g_xa = torch.mm(g, b).mul_(s)  # (T x r): tiny
            torch.mm(g.t(), xa).mul_(s)  # dB (out x r)
            torch.mm(g_xa.t(), x2)  # dA (r x in)
            gx.addmm_(g_xa, a)
        return gx

    return forward_backward
