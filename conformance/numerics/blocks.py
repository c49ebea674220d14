"""OFT's block-diagonal layout: blocks from the config, block-diagonal rotations and block-wise error terms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .cayley import oft_blocks
from .rounding import gamma_n


def oft_layout(in_features: int, params: Mapping[str, Any]) -> tuple[int, int]:
    """(number of blocks, block size) from OFT params (exactly one of r / oft_block_size set)."""
    r = params.get("r", 8)
    bs = params.get("oft_block_size", 0)
    if r:
        return r, in_features // r
    return in_features // bs, bs


def _per_block(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    # one shared block (block_share: k == 1) stands for every block
    return blocks.expand(n_blocks, -1, -1) if blocks.shape[0] == 1 and n_blocks > 1 else blocks


def block_diagonal(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(k, b, b) -> (n_blocks*b, n_blocks*b)."""
    return torch.block_diag(*_per_block(blocks, n_blocks).unbind(0))


def rotate_input(x: torch.Tensor, blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """x (..., n_blocks*b) -> x @ blockdiag(R), block by block (differentiable)."""
    b = blocks.shape[-1]
    xb = x.reshape(*x.shape[:-1], n_blocks, 1, b)
    return (xb @ _per_block(blocks, n_blocks)).reshape(x.shape)


def oft_rotation(tensors: Mapping[str, torch.Tensor], n_blocks: int, block_size: int) -> torch.Tensor:
    """The exact block-diagonal rotation (in x in) in float64."""
    return block_diagonal(oft_blocks(tensors, block_size), n_blocks)


def expand_blocks(per_block: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """(k,) per-block values -> (n_blocks*block_size,) per-feature values (k == 1: shared)."""
    if per_block.numel() == 1:
        per_block = per_block.reshape(1).expand(n_blocks)
    return per_block.repeat_interleave(block_size)


def block_norms(m: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """(..., n) -> (..., n) with each entry replaced by the 2-norm of its block of the last dim."""
    mb = m.double().reshape(*m.shape[:-1], n_blocks, block_size)
    return torch.linalg.vector_norm(mb, dim=-1).repeat_interleave(block_size, dim=-1)


def rotate_error(
    m: torch.Tensor, r_abs: torch.Tensor, delta: torch.Tensor, n_blocks: int, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Bound on |m R_computed - m R| (rows of ``m`` rotated block-wise, computed in ``dtype``).

    ``|m_blk (R_c - R)_col| <= ||m_blk||_2 * delta_blk`` plus the dot-product rounding
    ``gamma_b |m| (|R| + delta)``. Used for OFT's input rotation (``x R``) and merge (``W R^T``:
    pass ``R^T``'s magnitudes; the block norms are the same).
    """
    d = expand_blocks(delta, n_blocks, block_size)
    mv = m.double().cpu()
    return block_norms(mv, n_blocks, block_size) * d + gamma_n(block_size, dtype) * (mv.abs() @ (r_abs + d))
