"""Clauses of area ``oft_math``: OFT rotation math (checks: ``conformance.clauses.oft_math.checks``)."""

from conformance.clauses.clause import declare

SOURCE = ("OFT paper arXiv:2306.07280 (Cayley parametrisation, COFT); peft/tuners/oft/layer.py "
          "(peft v0.21.2: _cayley_batch, _project_batch, block_share)")

declare(
    "OFT-CAYLEY-EXACT", "MUST",
    "With use_cayley_neumann=False, get_delta_weight is block-diagonal (off-block entries exactly 0) and each block "
    "is the Cayley transform (I - Q)(I + Q)^{-1} of the stored parameters within the LU-solve error bound.",
    source=SOURCE,
    methods=["oft"],
    area='oft_math',
)

declare(
    "OFT-ORTHOGONAL", "MUST",
    "Exact-Cayley OFT rotations are orthogonal: ||R_b^T R_b - I||_F <= 2 d + d^2 per block, d the solve error "
    "bound derived from the unit roundoff and the block size.",
    source=SOURCE,
    methods=["oft"],
    area='oft_math',
)

declare(
    "OFT-NEUMANN-CONVERGES", "MUST",
    "The Cayley-Neumann rotation with n terms (n = 2..8) is within ||Q||_2^(n-1) (plus rounding) of the exact Cayley "
    "rotation of the same parameters, so its error shrinks as n grows and it converges to the exact path's rotation "
    "(not, e.g., to its transpose).",
    source=SOURCE + "; Neumann series (I + Q)^{-1} = sum (-Q)^k for ||Q|| < 1",
    methods=["oft"],
    area='oft_math',
)

declare(
    "OFT-COFT-RADIUS", "MUST",
    "With coft=True every rotation block stays within ||R_b - I||_F <= 2 eps / sqrt(blocks) (plus rounding), since "
    "R - I = -2 Q (I + Q)^{-1}, ||(I + Q)^{-1}||_2 <= 1 and COFT projects ||Q_b||_F <= eps / sqrt(blocks).",
    source=SOURCE,
    methods=["oft"],
    area='oft_math',
)

declare(
    "OFT-BLOCK-SHARE", "MUST",
    "With block_share=True all diagonal blocks of the rotation are identical (one shared block).",
    source=SOURCE,
    methods=["oft"],
    area='oft_math',
)
