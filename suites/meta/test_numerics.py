"""Meta tests of the suite's own numerics (``conformance.numerics``): the yardstick's yardstick.

The clauses trust these helpers to be exact (float64 values) and sound (bounds that cover the
arithmetic they model); each test checks one of them against a direct computation or against the
bitsandbytes kernel it models.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import numerics
from conformance.numerics import cayley
from conformance.numerics.rounding import INT8_DEQUANT_ERROR, INT8_DEQUANT_SCALE_ERROR, U32

NUMERICS_DIR = Path(numerics.__file__).parent
FORBIDDEN = ("conformance.reference", "conformance.clauses", "conformance.spec", "conformance.harness", "conformance.impls",
             "conformance.cli")


def _theta(k: int, b: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(k, b * (b - 1) // 2, generator=gen, dtype=torch.float64)


# -- Cayley -------------------------------------------------------------------------------------

def test_skew_layout_is_row_major_upper_triangle() -> None:
    theta = torch.arange(1.0, 7.0, dtype=torch.float64)[None]
    q = cayley.skew(theta, 4)[0]
    want = torch.tensor([[0, 1, 2, 3], [-1, 0, 4, 5], [-2, -4, 0, 6], [-3, -5, -6, 0]], dtype=torch.float64)
    assert torch.equal(q, want)


def test_skew_rejects_wrong_width_with_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"block size 4 must be \(k, 6\), got \(1, 5\)"):
        cayley.skew(torch.zeros(1, 5), 4)


@pytest.mark.parametrize("b", [4, 8, 16])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_cayley_is_orthogonal_and_matches_a_direct_solve(b: int, scale: float) -> None:
    q = cayley.skew(_theta(3, b, scale, b), b)
    eye = torch.eye(b, dtype=torch.float64)
    r = numerics.cayley_exact(q)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye.expand_as(r), rtol=0, atol=1e-12)
    # the definition, evaluated the other way round: (I - Q) (I + Q)^-1 with an explicit inverse
    direct = (eye - q) @ torch.linalg.inv(eye + q)
    torch.testing.assert_close(r, direct, rtol=0, atol=1e-12)
    assert bool((torch.linalg.det(r) - 1).abs().max() < 1e-10)  # a rotation, not a reflection


@pytest.mark.parametrize("terms", [1, 2, 3, 5, 8])
def test_neumann_differs_from_cayley_by_exactly_r_times_minus_q_power(terms: int) -> None:
    q = cayley.skew(_theta(2, 8, 0.05, terms), 8)
    r = numerics.cayley_exact(q)
    want = r @ torch.linalg.matrix_power(-q, terms - 1)
    torch.testing.assert_close(numerics.neumann(q, terms) - r, -want if terms > 1 else torch.eye(8) - r,
                               rtol=0, atol=1e-13)


def test_neumann_rejects_zero_terms() -> None:
    with pytest.raises(ValueError, match="num_cayley_neumann_terms must be >= 1, got 0"):
        numerics.neumann(torch.zeros(1, 4, 4, dtype=torch.float64), 0)


@given(st.sampled_from([4, 8, 16]), st.sampled_from([0.01, 0.3, 3.0]), st.integers(0, 2**16))
def test_float32_solve_is_within_rotation_error(b: int, scale: float, seed: int) -> None:
    """``rotation_error`` (LU backward error) covers a float32 Cayley solve, per block, in Frobenius norm."""
    theta = _theta(4, b, scale, seed).float()
    q32 = cayley.skew(theta, b)
    eye = torch.eye(b).expand_as(q32)
    r32 = torch.linalg.solve(eye + q32, eye - q32, left=False)
    exact = numerics.oft_blocks({"oft_R.weight": theta}, b)
    err = torch.linalg.matrix_norm(r32.double() - exact, ord="fro")
    assert numerics.max_ratio(err, numerics.rotation_error({"oft_R.weight": theta}, b)) <= 1.0


def test_solve_error_is_inf_not_nan_when_the_solve_has_no_bound() -> None:
    # gamma_12 at a unit roundoff of 2**-4 is 3: eps * kappa >= 1, the LU backward-error bound says nothing
    s_abs, e = numerics.solve_error(_theta(1, 4, 1.0, 0), 4, 2.0**-4)
    assert torch.isfinite(s_abs).all() and bool(torch.isinf(e).all())


def test_rotate_input_is_the_block_diagonal_product_shared_or_not() -> None:
    blocks = numerics.cayley_exact(cayley.skew(_theta(3, 4, 0.5, 7), 4))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(numerics.rotate_input(x, blocks, 3), x @ numerics.block_diagonal(blocks, 3))
    torch.testing.assert_close(numerics.rotate_input(x, blocks[:1], 3), x @ numerics.block_diagonal(blocks[:1], 3))


# -- the ratio helper ---------------------------------------------------------------------------

@pytest.mark.parametrize(("err", "bound", "want"), [
    (0.0, 0.0, 0.0),            # 0/0: exact where nothing could go wrong
    (1e-30, 0.0, math.inf),     # a difference where none is allowed
    (0.5, 2.0, 0.25),
    (math.inf, 1.0, math.inf),  # non-finite observed value
    (math.nan, 1.0, math.inf),
    (1.0, math.nan, math.inf),  # no bound could be computed
    (0.0, math.nan, math.inf),
    (1.0, math.inf, 0.0),       # no constraint
    (math.inf, math.inf, math.inf),
])
def test_ratio_conventions(err: float, bound: float, want: float) -> None:
    got = numerics.max_ratio(torch.tensor([err], dtype=torch.float64), torch.tensor([bound], dtype=torch.float64))
    assert got == want


def test_ratio_is_never_nan_and_locates_the_worst_element() -> None:
    err = torch.tensor([[0.0, 1.0, math.nan], [0.5, 0.0, 0.1]])
    bound = torch.tensor([[0.0, 4.0, 1.0], [1.0, 0.0, 0.05]])
    assert numerics.worst(err, bound) == (math.inf, 2)
    r, i = numerics.worst(err[1:], bound[1:])
    assert (r, i) == (pytest.approx(2.0), 2)
    assert numerics.worst(torch.zeros(0), torch.zeros(0)) == (0.0, -1)
    assert not torch.isnan(numerics.ratios(err, bound)).any()


def test_compare_reports_shape_and_non_finite_values() -> None:
    exact = torch.zeros(2, 3, dtype=torch.float64)
    assert numerics.compare(torch.zeros(3, 2), exact, exact)[0] == math.inf
    got = torch.tensor([[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]])
    r, where = numerics.compare(got, exact, torch.ones_like(exact))
    assert r == math.inf and "non-finite" in where
    r, where = numerics.compare(torch.full((2, 3), 0.5), exact, torch.ones_like(exact))
    assert r == 0.5 and where.startswith("entry 0:")


# -- expected outputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_path_is_the_direct_float64_value_and_bounds_the_dtype_computation(dtype: torch.dtype,
                                                                                rslora: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    r, alpha = 4, 16.0
    tensors = {"lora_A.weight": torch.randn(r, 64, generator=gen).to(dtype),
               "lora_B.weight": torch.randn(48, r, generator=gen).to(dtype),
               "lora_B.bias": torch.randn(48, generator=gen).to(dtype)}
    x = torch.randn(5, 64, generator=gen).to(dtype)
    s = numerics.lora_scaling({"r": r, "lora_alpha": alpha, "use_rslora": rslora})
    assert s == (alpha / math.sqrt(r) if rslora else alpha / r)
    exp = numerics.lora_path(tensors, s, x, dtype)
    a, b, bb = (tensors[k].double() for k in ("lora_A.weight", "lora_B.weight", "lora_B.bias"))
    torch.testing.assert_close(exp.value, s * ((x.double() @ a.t()) @ b.t() + bb), rtol=1e-14, atol=0)
    # the same computation in the adapter dtype stays within the bound
    with torch.no_grad():
        got = (torch.nn.functional.linear(torch.nn.functional.linear(x, tensors["lora_A.weight"]),
                                          tensors["lora_B.weight"], tensors["lora_B.bias"]) * s)
    assert exp.ratio(got) <= 1.0, exp.describe(got)


def test_lora_delta_is_scaling_times_b_at_a() -> None:
    gen = torch.Generator().manual_seed(4)
    t = {"lora_A.weight": torch.randn(8, 32, generator=gen), "lora_B.weight": torch.randn(16, 8, generator=gen)}
    want = 0.5 * t["lora_B.weight"].double() @ t["lora_A.weight"].double()
    torch.testing.assert_close(numerics.lora_delta(t, 0.5), want, rtol=0, atol=0)
    got = 0.5 * (t["lora_B.weight"] @ t["lora_A.weight"])
    assert numerics.observed(got, want, numerics.lora_delta_error(t, 0.5)) <= 1.0


def test_int8_dequant_error_covers_the_bitsandbytes_kernel() -> None:
    """``INT8_DEQUANT_ERROR`` (the derived form of the old ``* 1.0001`` slack) bounds bnb's int8_mm_dequant."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    gen = torch.Generator().manual_seed(5)
    acc = torch.randint(-127 * 127 * 96, 127 * 127 * 96, (64, 48), generator=gen, dtype=torch.int32)
    row = torch.rand(64, generator=gen) * 10 + 1e-3
    col = torch.rand(48, generator=gen) * 10 + 1e-3
    got = torch.ops.bitsandbytes.int8_mm_dequant(acc, row, col, dtype=torch.float32).double()
    exact = acc.double() * (row.double()[:, None] * col.double()[None, :]) / 127**2
    assert numerics.observed(got, exact, INT8_DEQUANT_ERROR * exact.abs()) <= 1.0
    # the multiplied-out product is its first-order sum plus second-order terms only (1.0001 over-covered it)
    first = 3 * U32 + INT8_DEQUANT_SCALE_ERROR
    assert first < INT8_DEQUANT_ERROR < first * (1 + 4 * (U32 + INT8_DEQUANT_SCALE_ERROR))


# -- independence from the reference -------------------------------------------------------------

@pytest.mark.e2e
def test_numerics_imports_no_reference_spec_or_harness() -> None:
    """Importing and using every numerics module loads none of the layers it is meant to check."""
    code = (
        "import json, sys, importlib, pkgutil, torch\n"
        "import conformance.numerics as n\n"
        "for m in pkgutil.iter_modules(n.__path__): importlib.import_module('conformance.numerics.' + m.name)\n"
        "t = {'oft_R.weight': 0.1 * torch.randn(2, 28)}\n"
        "n.oft_rotation(t, 2, 8); n.rotation_error(t, 8); n.inverse_rotation_error(t, 8)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('conformance'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "conformance.numerics.cayley" in loaded
    bad = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert not bad, f"conformance.numerics loaded {bad}"


def test_numerics_sources_never_import_reference_spec_or_harness() -> None:
    """Also imports inside functions (which a fresh-process import would not run)."""
    offenders = []
    for path in sorted(NUMERICS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(FORBIDDEN)]
    assert not offenders


def test_no_package_attribute_shadows_a_submodule() -> None:
    """``from conformance.numerics import cayley`` must give the module, not a function of that name."""
    import importlib
    import pkgutil
    import types

    for m in pkgutil.iter_modules(numerics.__path__):
        importlib.import_module(f"conformance.numerics.{m.name}")
        assert isinstance(getattr(numerics, m.name), types.ModuleType), m.name
