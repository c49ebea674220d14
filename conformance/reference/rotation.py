"""OFT rotation math: skew-symmetric parametrisation, Cayley transform, Neumann series, COFT.

Parameter layout follows PEFT (``OFTRotationModule.weight``): one row per block holding the
strict upper triangle of a skew-symmetric ``Q`` (row-major ``torch.triu_indices(b, b, 1)``).

Rotation: the Cayley transform ``R = (I - Q)(I + Q)^{-1}`` as in the OFT paper's code
(Qiu et al. 2023, arXiv:2306.07280, ``oft.py:cayley_batch``) and PEFT's exact path. The Neumann
approximation expands the same map: ``(I - Q) sum_{k<n-1} (-Q)^k``; it converges to the exact
rotation as the number of terms grows (clause OFT-NEUMANN-CONVERGES).
"""

from __future__ import annotations

import math

import torch


def n_elements(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(blocks, n_elements) -> (blocks, b, b) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    q = torch.zeros(vec.shape[0], block_size, block_size, device=vec.device, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def unskew(q: torch.Tensor) -> torch.Tensor:
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[:, rows, cols]


def cayley(q: torch.Tensor, *, neumann_terms: int | None = None) -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric ``q``; ``neumann_terms`` selects the series."""
    b = q.shape[-1]
    eye = torch.eye(b, device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        # X (I + Q) = (I - Q)  <=>  X = (I - Q)(I + Q)^{-1}; the two factors commute. torch's solve has no
        # float16/bfloat16 kernel on the CPU ("lu_cpu") nor on CUDA ("lu_factor_cublas", torch 2.11): half blocks
        # are solved in float32 and rounded back
        if q.dtype in (torch.float16, torch.bfloat16):
            return torch.linalg.solve((eye + q).float(), (eye - q).float(), left=False).to(q.dtype)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if neumann_terms < 1:
        raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {neumann_terms}")
    series = eye.clone()
    power = eye
    for _ in range(neumann_terms - 2):
        power = -torch.bmm(power, q)
        series = series + power
    return torch.bmm(eye - q, series) if neumann_terms > 1 else series


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: scale each block's Q into the Frobenius ball of radius eps/sqrt(blocks).

    Same rule as PEFT's ``_project_batch`` (from the OFT authors' code): blocks inside the ball
    are untouched, blocks outside are scaled onto its surface.
    """
    q = skew(vec, block_size)
    radius = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.matrix_norm(q, ord="fro", keepdim=True)
    scale = torch.where(norm <= radius, torch.ones_like(norm), radius / norm.clamp_min(torch.finfo(q.dtype).tiny))
    return unskew(q * scale)


def block_diagonal(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(k, b, b) -> (n_blocks*b, n_blocks*b); one shared block (k == 1) is repeated."""
    if blocks.shape[0] == 1 and n_blocks > 1:
        blocks = blocks.expand(n_blocks, -1, -1)
    return torch.block_diag(*blocks.unbind(0))


def rotate_input(x: torch.Tensor, blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """x (..., n_blocks*b) -> x @ blockdiag(R); the layer then computes base(x @ R)."""
    b = blocks.shape[-1]
    if blocks.shape[0] == 1 and n_blocks > 1:
        blocks = blocks.expand(n_blocks, -1, -1)
    xr = x.reshape(*x.shape[:-1], n_blocks, b)
    return torch.einsum("...rk,rkc->...rc", xr, blocks).reshape(x.shape)
