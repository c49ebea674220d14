"""Exact float64 Cayley rotations of OFT parameters and the bounds on computing them in a finite dtype.

Written from the math, independently of ``conformance.reference.rotation`` (the reference is checked
against this, never against its own code). Parameter layout (PEFT ``OFTRotationModule.weight``): one
row per block holding the strict upper triangle of a skew-symmetric ``Q``, row-major.

``R = (I - Q)(I + Q)^{-1}``; the two factors commute, so it is computed here as the left solve
``(I + Q) R = I - Q``. Its n-term Neumann form is ``(I - Q) sum_{k=0}^{n-2} (-Q)^k``.

Solve errors are the LU backward-error result (Higham, *Accuracy and Stability of Numerical
Algorithms*, Thm 9.4): ``(A + dA) x = b`` with ``|dA| <= gamma_3b |L||U|``, and ``||(I + Q)^{-1}||_2
<= 1`` for skew-symmetric ``Q`` (its eigenvalues are ``1 + i t``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from conformance.quant import bounds as qbounds

from .rounding import U32, U64


def skew(theta: torch.Tensor, block_size: int) -> torch.Tensor:
    """(k, b(b-1)/2) upper-triangle parameters -> (k, b, b) skew-symmetric ``Q`` (same dtype/device)."""
    n = block_size * (block_size - 1) // 2
    if theta.dim() != 2 or theta.shape[-1] != n:
        raise ValueError(f"OFT parameters of block size {block_size} must be (k, {n}), got {tuple(theta.shape)}")
    upper = torch.ones(block_size, block_size, dtype=torch.bool, device=theta.device).triu(1)
    q = theta.new_zeros(theta.shape[0], block_size * block_size)
    q = q.masked_scatter(upper.flatten().expand_as(q), theta) if theta.numel() else q
    q = q.reshape(-1, block_size, block_size)
    return q - q.transpose(-1, -2)


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley rotation ``(I - Q)(I + Q)^{-1}`` of a (k, b, b) skew-symmetric batch (differentiable)."""
    eye = _eye_like(q)
    return torch.linalg.solve(eye + q, eye - q)


def neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """The n-term Cayley-Neumann approximation ``(I - Q) sum_{k=0}^{n-2} (-Q)^k`` (differentiable)."""
    if terms < 1:
        raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {terms}")
    eye = _eye_like(q)
    if terms == 1:
        return eye.clone()
    series, power = eye.clone(), eye
    for _ in range(terms - 2):
        power = power @ (-q)
        series = series + power
    return (eye - q) @ series


def rotation_blocks(theta: torch.Tensor, block_size: int, neumann_terms: int | None = None) -> torch.Tensor:
    """(k, b, b) rotation blocks of parameters ``theta`` in float64 (exact Cayley, or Neumann with n terms)."""
    q = skew(theta.double(), block_size)
    return cayley_exact(q) if neumann_terms is None else neumann(q, neumann_terms)


def oft_blocks(tensors: Mapping[str, torch.Tensor], block_size: int, neumann_terms: int | None = None
               ) -> torch.Tensor:
    """(k, b, b) float64 rotation blocks of an OFT adapter's stored parameters."""
    return rotation_blocks(tensors["oft_R.weight"].detach().double().cpu(), block_size, neumann_terms)


def lu_growth(a: torch.Tensor) -> torch.Tensor:
    """|| |L||U| ||_2 per matrix of a (k, n, n) float64 batch (partial pivoting)."""
    _, lo, up = torch.linalg.lu(a)
    return torch.linalg.matrix_norm(lo.abs() @ up.abs(), ord=2)


def rotation_error(tensors: Mapping[str, torch.Tensor], block_size: int) -> torch.Tensor:
    """Per-block bound on ||R_computed - R_exact||_F for the exact Cayley path in the parameter dtype.

    R solves ``R (I + Q) = I - Q`` (or the transposed system). Each of the b right-hand sides
    ``j`` gets its own backward error ``|dA_j| <= gamma_3b |L||U|``; with ``||A^{-1}||_2 <= 1``,
    ``||r_j - r_j_exact|| <= ||dA_j||_2 ||r_j||``, so ``||R_c - R||_F <= g ||R_c||_F`` with
    ``g = gamma_3b || |L||U| ||_2`` and ``||R||_F = sqrt(b)``: ``||R_c - R||_F <= g sqrt(b)/(1-g)``.
    ``I +- Q`` are formed exactly (one nonzero per off-diagonal entry).
    """
    p = tensors["oft_R.weight"].detach()
    q = skew(p.double().cpu(), block_size)
    eye = _eye_like(q)
    growth = torch.maximum(lu_growth(eye + q), lu_growth(eye - q))
    g = qbounds.gamma(3 * block_size, qbounds.unit_roundoff(p.dtype)) * growth
    return g * math.sqrt(block_size) / (1 - g)


def inverse_rotation_error(tensors: Mapping[str, torch.Tensor], block_size: int) -> torch.Tensor:
    """Per-block bound on ||Rinv_computed - R^T||_F when unmerge inverts the computed rotation.

    ``R_c = R + E`` (``||E||_F <= d``, ``rotation_error``) has ``||R_c^{-1} - R^T||_2 <= d/(1-d)``;
    solving with ``R_c`` in float32 adds the LU backward error ``gamma_3b(u32) || |L||U| ||_2``
    (of ``R``) times ``||R_c^{-1}||_F <= sqrt(b)/(1-d)``.
    """
    d = rotation_error(tensors, block_size)
    r = oft_blocks(tensors, block_size)
    g = qbounds.gamma(3 * block_size, U32) * lu_growth(r)
    return d / (1 - d) + g * math.sqrt(block_size) / (1 - d) / (1 - g)


def solve_error(theta: torch.Tensor, block_size: int, u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(|S|, per-block entrywise bound on |S_computed - S|) for ``S = (I+Q)^-1`` solved with unit roundoff ``u``.

    Normwise relative error ``eta = 2 eps kappa / (1 - eps kappa)`` with ``eps = gamma_3b(u)
    || |L||U| ||_inf / ||A||_inf`` (Higham Thm 9.4 + 7.2, LU with partial pivoting of ``A = I + Q``
    evaluated in float64); ``inf`` when ``eps kappa >= 1`` (no bound, never NaN). Entrywise:
    ``|dR_ij| <= ||dR||_inf <= eta ||S||_inf ||I-Q||_inf`` and every row sum of ``|I-Q|`` is >= 1, so
    ``E_S = eta ||S|| ||I-Q||`` per entry majorizes the propagated error through ``R = (I-Q) S``.
    """
    q = skew(theta.double(), block_size)
    a = _eye_like(q) + q
    s = torch.linalg.inv(a)
    _, lo, up = torch.linalg.lu(a)

    def inf_norm(m: torch.Tensor) -> torch.Tensor:
        return m.abs().sum(-1).amax(-1)

    growth = inf_norm(lo.abs() @ up.abs()) / inf_norm(a)
    kappa = inf_norm(a) * inf_norm(s)
    ek = qbounds.gamma(3 * block_size, u) * growth * kappa
    eta = torch.where(ek < 1, 2 * ek / (1 - ek).clamp_min(1e-300), torch.full_like(ek, math.inf))
    e = (eta * inf_norm(s) * inf_norm(a))[:, None, None].expand_as(s).clone()
    return s.abs(), e


def orthogonality_bound(d: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bound on ||R_c^T R_c - I||_F given ``||R_c - R||_F <= d`` (R orthogonal, ``||R||_F = sqrt(b)``).

    ``R_c^T R_c - I = R^T E + E^T R + E^T E``: ``2d + d^2``, plus the float64 evaluation of ``R_c^T R_c``
    (``gamma_b(u64) ||R_c||_F^2``).
    """
    return 2 * d + d * d + qbounds.gamma(block_size, U64) * (math.sqrt(block_size) + d) ** 2


def coft_bound(radius: float, block_size: int, d: torch.Tensor) -> torch.Tensor:
    """Bound on ||R_b - I||_F of a COFT block projected into the Frobenius ball of ``radius``.

    ``||Q||_F <= radius`` gives ``||R - I||_F = ||2 Q (I+Q)^-1||_F <= 2 radius``; the projection's
    float32 rescale of the b*b entries (norm, division, product: ``gamma_{b^2+4}(u32)``) and the
    solve error ``d`` (``rotation_error``) come on top.
    """
    return 2 * radius * (1 + qbounds.gamma(block_size * block_size + 4, U32)) + d


def neumann_rounding(q2: float, qf: float, b: int, n: int, dtype: torch.dtype) -> float:
    """Bound on ||fl(series) - series||_F for an n-term Cayley-Neumann series computed in ``dtype``.

    Powers ``Q^k`` by k-1 products (``||fl(AB) - AB||_F <= gamma_b ||A||_F ||B||_F``), coefficients
    at most 2, n additions of partial sums bounded by ``M = sqrt(b) + 2 sum_k qf^k``, one final
    product with ``I +- Q`` (``||I +- Q||_2 = sqrt(1 + q2^2)``).
    """
    u = qbounds.unit_roundoff(dtype)
    g = qbounds.gamma(b, u)
    m = math.sqrt(b) + 2 * sum(qf**k for k in range(1, n + 1))
    err_s = sum(2 * (k - 1) * g * (1 + g) ** k * qf**k for k in range(2, n + 1)) + n * u * m
    return math.sqrt(1 + q2 * q2) * err_s + g * (math.sqrt(b) + qf) * m + u * m


def neumann_bound(q2: float, qf: float, b: int, n: int, dtype: torch.dtype) -> float:
    """Bound on ||R_neumann_computed - R_cayley||_2: the truncation ``||Q||_2^(n-1)`` plus ``neumann_rounding``.

    The n-term series differs from ``R`` by exactly ``R (-Q)^(n-1)`` and ``R`` is orthogonal.
    """
    return q2 ** (n - 1) + neumann_rounding(q2, qf, b, n, dtype)
