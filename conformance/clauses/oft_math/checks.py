"""OFT rotation math: exact Cayley transform, orthogonality, Neumann convergence, COFT radius, block sharing.

All tolerances are derived in ``conformance.numerics.cayley`` (``rotation_error``: LU backward error of
the solve; ``neumann_rounding``: Frobenius-norm error propagation through the power series;
``orthogonality_bound``, ``coft_bound``), never fitted; the exact rotation is computed there in float64,
independently of the reference's code.

Cayley: ``R = (I - Q)(I + Q)^{-1}`` for skew-symmetric ``Q`` (OFT paper code ``cayley_batch``, PEFT's
exact path). Its Neumann approximation with n terms, ``(I - Q) sum_{k=0}^{n-2} (-Q)^k``, differs from
``R`` by exactly ``R (-Q)^{n-1}``, so ``||R_n - R||_2 = ||Q||_2^{n-1}``: it must shrink with n.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

IN_FEATURES = cases.OFT_IN_FEATURES


def _blocks(r: torch.Tensor, n_blocks: int, size: int) -> tuple[torch.Tensor, float]:
    """(k, b, b) diagonal blocks of a block-diagonal matrix, and the largest off-block magnitude."""
    r = r.detach().double().cpu()
    blocks = torch.stack([r[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(n_blocks)])
    mask = torch.block_diag(*[torch.ones(size, size, dtype=torch.bool)] * n_blocks)
    off = float(r[~mask].abs().max()) if (~mask).any() else 0.0
    return blocks, off


def _oft_layer(ctx: CheckContext, bits: int, block_size: int, **extra: object) -> torch.nn.Module:
    base = ctx.make_base(cases.BaseCase(bits, IN_FEATURES, 48))
    return ctx.make_layer(base, "oft", r=IN_FEATURES // block_size, oft_block_size=0, init_weights=False, **extra)


def _delta(layer: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return layer.get_delta_weight("default")


NORMS = cases.OFT_SKEW_NORMS


@check("OFT-CAYLEY-EXACT")
def check_cayley_exact(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        for bs in cases.OFT_BLOCK_SIZES:
            for norm in NORMS:
                with ctx.case(f"oft {bits}-bit block size {bs}, ||Q||_2 = {norm}"):
                    layer = _oft_layer(ctx, bits, bs)
                    cases.set_skew_norm(layer, "default", bs, norm, ctx.generator(bs))
                    tensors = layer.adapter_parameters("default")
                    blocks, off = _blocks(_delta(layer), IN_FEATURES // bs, bs)
                    label = f"oft {bits}-bit block size {bs}, ||Q||_2 = {norm}"
                    ctx.check(off == 0.0, f"{label}: get_delta_weight has off-block entries (max {off:.3g})")
                    exact = numerics.oft_blocks(tensors, bs)
                    delta = numerics.rotation_error(tensors, bs)
                    err = torch.linalg.matrix_norm(blocks - exact, ord="fro")
                    ctx.bounded(f"ratio.b{bs}", numerics.max_ratio(err, delta), lambda: (
                        f"{label}: rotation differs from (I-Q)(I+Q)^-1 by {err.max():.3g} (Frobenius) > bound "
                        f"{delta.max():.3g}; distance to the transpose (I+Q)(I-Q)^-1: "
                        f"{torch.linalg.matrix_norm(blocks - exact.transpose(-2, -1), ord='fro').max():.3g}"))


@check("OFT-ORTHOGONAL")
def check_orthogonal(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        for bs in cases.OFT_BLOCK_SIZES:
            for norm in NORMS:
                with ctx.case(f"oft {bits}-bit block size {bs}, ||Q||_2 = {norm}"):
                    layer = _oft_layer(ctx, bits, bs)
                    cases.set_skew_norm(layer, "default", bs, norm, ctx.generator(bs + 1))
                    blocks, _ = _blocks(_delta(layer), IN_FEATURES // bs, bs)
                    d = numerics.rotation_error(layer.adapter_parameters("default"), bs)
                    eye = torch.eye(bs, dtype=torch.float64)
                    defect = torch.linalg.matrix_norm(blocks.transpose(-2, -1) @ blocks - eye, ord="fro")
                    bound = numerics.orthogonality_bound(d, bs)
                    ctx.bounded(f"ratio.b{bs}", numerics.max_ratio(defect, bound), lambda: (
                        f"oft {bits}-bit block size {bs}, ||Q||_2 = {norm}: ||R^T R - I||_F = "
                        f"{defect.max():.3g} > bound {bound.max():.3g}"))


NEUMANN_TERMS = cases.NEUMANN_TERMS


@check("OFT-NEUMANN-CONVERGES")
def check_neumann(ctx: CheckContext) -> None:
    bs = cases.NEUMANN_BLOCK_SIZE
    for _, bits in ctx.cases():
        exact_layer = _oft_layer(ctx, bits, bs)
        q2 = cases.set_skew_norm(exact_layer, "default", bs, 0.5, ctx.generator(21))
        params = exact_layer.adapter_parameters("default")["oft_R.weight"].detach().clone()
        q = numerics.skew(params.double().cpu(), bs)
        qf = float(torch.linalg.matrix_norm(q, ord="fro").max())
        exact = numerics.oft_blocks({"oft_R.weight": params}, bs)
        errors = []
        for n in NEUMANN_TERMS:
            layer = _oft_layer(ctx, bits, bs, use_cayley_neumann=True, num_cayley_neumann_terms=n)
            with torch.no_grad():
                layer.adapter_parameters("default")["oft_R.weight"].copy_(params)
            blocks, _ = _blocks(_delta(layer), IN_FEATURES // bs, bs)
            err = float(torch.linalg.matrix_norm(blocks - exact, ord=2).max())
            errors.append(err)
            bound = numerics.neumann_bound(q2, qf, bs, n, params.dtype)
            ctx.measure(f"error.{bits}bit.n{n}", err)
            ctx.measure(f"bound.{bits}bit.n{n}", bound)
            if not err <= bound:
                t = float(torch.linalg.matrix_norm(blocks - exact.transpose(-2, -1), ord=2).max())
                ctx.fail(f"oft {bits}-bit, {n} Neumann terms, ||Q||_2 = {q2:.3g}: ||R_neumann - R_cayley||_2 = "
                         f"{err:.3g} > {bound:.3g} (= ||Q||^(n-1) + rounding); distance to the transpose of the "
                         f"exact rotation: {t:.3g}; errors so far {[f'{e:.3g}' for e in errors]}")
        ctx.check(errors[-1] < errors[0],
                  f"oft {bits}-bit: Neumann error does not shrink with more terms: {[f'{e:.3g}' for e in errors]}")


@check("OFT-COFT-RADIUS")
def check_coft(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        for bs in cases.COFT_BLOCK_SIZES:
            with ctx.case(f"oft {bits}-bit block size {bs}, coft"):
                eps = 0.05
                layer = _oft_layer(ctx, bits, bs, coft=True, eps=eps)
                cases.fill_adapter(layer, "default", ctx.generator(31), scale=20.0)  # far outside the ball
                n_blocks = IN_FEATURES // bs
                with torch.no_grad():
                    layer(ctx.randn(2, IN_FEATURES))  # PEFT projects in forward
                blocks, _ = _blocks(_delta(layer), n_blocks, bs)
                radius = eps / math.sqrt(n_blocks)
                d = numerics.rotation_error(layer.adapter_parameters("default"), bs)
                bound = numerics.coft_bound(radius, bs, d)
                dist = torch.linalg.matrix_norm(blocks - torch.eye(bs, dtype=torch.float64), ord="fro")
                ctx.bounded(f"ratio.b{bs}", numerics.max_ratio(dist, bound), lambda: (
                    f"oft {bits}-bit block size {bs}, coft eps={eps}: ||R_b - I||_F = {dist.max():.3g} > "
                    f"2 eps/sqrt({n_blocks}) + rounding = {bound.max():.3g}"))


@check("OFT-BLOCK-SHARE")
def check_block_share(ctx: CheckContext) -> None:
    for _, bits in ctx.cases():
        for bs in cases.OFT_BLOCK_SIZES:  # block share
            with ctx.case(f"oft {bits}-bit block size {bs}, block_share=True"):
                base = ctx.make_base(cases.BaseCase(bits, IN_FEATURES, 48))
                layer = ctx.make_layer(base, "oft", r=0, oft_block_size=bs, block_share=True, init_weights=False)
                cases.fill_adapter(layer, "default", ctx.generator(41), scale=4.0)
                blocks, off = _blocks(_delta(layer), IN_FEATURES // bs, bs)
                rows = layer.adapter_parameters("default")["oft_R.weight"].shape[0]
                ctx.measure(f"param_rows.b{bs}", rows)
                label = f"oft {bits}-bit block size {bs}, block_share=True"
                ctx.check(off == 0.0, f"{label}: off-block entries (max {off:.3g})")
                ctx.check(not torch.allclose(blocks[0], torch.eye(bs, dtype=torch.float64)),
                          f"{label}: the shared block is the identity; the adapter parameters had no effect")
                same = [bool(torch.equal(blocks[0], blocks[i])) for i in range(blocks.shape[0])]
                ctx.check(all(same), f"{label}: blocks differ: identical to block 0: {same}")
