"""DoRA in the benchmarks (``conformance.bench``): the cases, the floors, a tiny CPU run, the report and figures.

- the matrix: DoRA r=16 at the training shapes for the bare layer, the measured floor, the reference and PEFT, and
  ``--filter dora-`` (the command the H200 run uses) picks exactly those;
- the peak floor: DoRA's norm adds the ``B A`` GEMM to the FLOPs and one read of the packed weight per forward to the
  bytes, derived from the shapes (no fitted constant);
- the measured floor does DoRA's work: in float64 its forward and input gradient are the float64 oracle's
  (``conformance.numerics.dora``) within float64 rounding;
- a tiny CPU run produces DoRA rows with the reference / PEFT ratio and the distance from the floor, reported and
  never checked against a target.

Fast, CPU; no test looks at a duration.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conformance.bench import DEFAULT_METHODS, METHODS, parse_methods, report, roofline
from conformance.bench import __main__ as bench_main
from conformance.bench.cases import (
    GPU_SHAPES,
    IMPLS_DORA,
    OPS_RUN,
    TRAINING_TOKENS,
    BenchCase,
    dora_cases,
    matrix,
    select,
)
from conformance.bench.layers import Builder, make_base
from conformance.impls.reference import ReferenceImplementation
from conformance.numerics import dora as nd
from conformance.numerics.rounding import gamma_n
from conformance.quant import dequantize

QUICK_DORA = matrix("cpu", quick=True, methods=("dora",))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- the cases -----------------------------------------------------------------------------------
def test_dora_cases_cover_the_training_shapes_for_reference_and_peft() -> None:
    cases = dora_cases()
    assert {c.method for c in cases} == {"dora"} and {c.op for c in cases} == set(OPS_RUN)
    assert {c.tokens for c in cases} <= set(TRAINING_TOKENS)
    four = [c for c in cases if c.bits == 4]
    assert {(c.in_features, c.out_features) for c in four} == set(GPU_SHAPES)
    assert {c.tokens for c in four} == set(TRAINING_TOKENS)
    assert {c.bits for c in cases} == {4, 8}
    groups: dict[str, set[str]] = {}
    for c in cases:
        groups.setdefault(c.group, set()).add(c.impl)
    assert all(impls == set(IMPLS_DORA) for impls in groups.values()), groups
    assert all(c.rank == 16 and c.adapter.params["init_lora_weights"] is False for c in cases)
    assert len({c.key for c in cases}) == len(cases)


def test_methods_pick_the_dora_cases_and_the_default_is_the_stored_matrix() -> None:
    """``--methods dora`` is the DoRA run alone; the default matrix (the stored baselines') has no DoRA row; every
    method is the default matrix followed by DoRA's cases (the lowest priority)."""
    assert matrix("cuda", methods=("dora",)) == dora_cases()
    assert select(matrix("cuda", methods=METHODS), "dora-") == dora_cases()
    assert all(c.method != "dora" for c in matrix("cuda")) and DEFAULT_METHODS == ("lora", "oft")
    assert matrix("cuda", methods=METHODS) == matrix("cuda") + dora_cases()
    assert matrix("cpu", quick=True, methods=METHODS) == matrix("cpu", quick=True) + QUICK_DORA
    with pytest.raises(ValueError, match="unknown method"):
        matrix("cuda", methods=("dora", "ia3"))


def test_methods_option_parses_and_refuses_a_typo(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_methods("dora") == ("dora",) and parse_methods("dora, lora") == ("lora", "dora")
    assert bench_main.main(["--methods", "doraa", "--quick", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --methods 'doraa': unknown method(s) doraa; choose from lora, oft, dora"), err
    assert len(err.strip().splitlines()) == 1


def test_a_dora_case_round_trips_through_its_record() -> None:
    case = dora_cases()[0]
    assert BenchCase.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    assert case.key.startswith("dora-nf4-dq/")


def test_the_quick_matrix_has_dora_rows() -> None:
    assert {c.impl for c in QUICK_DORA} == set(IMPLS_DORA)
    assert {c.op for c in QUICK_DORA} == set(OPS_RUN)


# -- the peak floor --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS_RUN)
@pytest.mark.parametrize("bits", [4, 8])
def test_dora_peak_floor_adds_the_norm(op: str, bits: int) -> None:
    """DoRA = LoRA + the norm's ``B A`` GEMM (2 out r in FLOPs) + one read of the packed weight, per forward (the
    norm is detached: the backward recomputes nothing of it); the bare layer of either group is the same."""
    i, o, t = 4096, 11008, 4096
    dora = BenchCase.make("reference", "dora", bits, i, o, t, "bfloat16", op)
    lora = BenchCase.make("reference", "lora", bits, i, o, t, "bfloat16", op)
    assert roofline.flops(dora) - roofline.flops(lora) == 2.0 * o * dora.rank * i
    assert roofline.min_bytes(dora) - roofline.min_bytes(lora) == roofline.weight_bytes(dora)
    for impl in roofline.BARE_IMPLS:
        assert roofline.flops(dora.with_impl(impl)) == roofline.flops(lora.with_impl(impl))
        assert roofline.min_bytes(dora.with_impl(impl)) == roofline.min_bytes(lora.with_impl(impl))
    peak = roofline.peak_for("NVIDIA H200")
    expected = max(roofline.flops(dora) / peak.flops, roofline.min_bytes(dora) / peak.bandwidth)
    assert roofline.peak_floor_s(dora, peak) == expected > roofline.peak_floor_s(lora, peak)


# -- the measured floor does DoRA's work -------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_dora_measured_floor_is_dora_in_float64(bits: int) -> None:
    """The floor's forward and input gradient, run in float64 on the dequantized weight, are DoRA's (the oracle's
    ``dora_grads``): both sides round in float64 only, each within gamma_n of the exact value for the longest chain
    of operations one output takes (the dot products over ``in`` and ``r``, the norm's sum over ``in``), so they
    differ by at most twice that times the magnitude of the terms."""
    i, o, t, r, s = 64, 48, 5, 4, 0.5
    case = BenchCase.make("floor", "dora", bits, i, o, t, "float32", "fwdbwd")
    base = make_base(case, "cpu")
    w0 = dequantize(base).double()
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3 for shape in ((r, i), (o, r)))
    m = nd.weight_norm(w0, a, b, s) * (1 + 0.2 * torch.rand(o, generator=gen, dtype=torch.float64))
    x = torch.randn(t, i, generator=gen, dtype=torch.float64)
    g = torch.randn(t, o, generator=gen, dtype=torch.float64)
    fwd = BenchCase.make("floor", "dora", bits, i, o, t, "float32", "fwd")
    y_floor, _ = roofline.floor_fn(fwd, base, x, None, (a, b, s), m)()
    gx_floor = roofline.floor_fn(case, base, x, g, (a, b, s), m)()
    y, grads = nd.dora_grads(x, g, w0, None, {"lora_A.weight": a, "lora_B.weight": b, nd.MAGNITUDE: m}, s)
    f = (m / nd.weight_norm(w0, a, b, s)).abs()
    u = 2 * gamma_n(2 * (i + r) + 8, torch.float64)
    y_scale = f * (x.abs() @ w0.abs().t() + s * (x.abs() @ a.abs().t()) @ b.abs().t())
    gx_scale = ((g.abs() * f) @ w0.abs()) + s * ((g.abs() * f) @ b.abs()) @ a.abs()
    assert ((y_floor - y).abs() <= u * y_scale).all()
    assert ((gx_floor - grads["x"]).abs() <= u * gx_scale).all()


def test_a_dora_floor_needs_the_factors() -> None:
    case = BenchCase.make("floor", "dora", 4, 64, 48, 2, "float32", "fwd")
    with pytest.raises(ValueError, match="needs the LoRA factors"):
        roofline.floor_fn(case, make_base(case, "cpu"), torch.zeros(2, 64), None, None, torch.ones(48))


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_floor_and_reference_rows_run_on_the_cpu(bits: int) -> None:
    """The floor of a DoRA group reads the reference layer's magnitude (positive: the layer's own initial norms);
    the floor and the reference run forward and forward+backward at a small shape, with finite outputs."""
    builder = Builder("cpu")
    fwd = BenchCase.make("reference", "dora", bits, 64, 48, 4, "float32", "fwd")
    layer = builder.layer(fwd)
    assert type(layer).__name__ == f"DoraLinear{bits}bit"
    m = builder.floor_magnitude(fwd.with_impl("floor"))
    assert torch.equal(m, layer.lora_magnitude_vector["default"].weight) and (m > 0).all()
    assert builder.floor_magnitude(BenchCase.make("floor", "lora", bits, 64, 48, 4, "float32", "fwd")) is None
    for op in OPS_RUN:
        for impl in ("floor", "reference"):
            out = builder.prepare(fwd.with_impl(impl) if op == "fwd" else BenchCase.make(
                impl, "dora", bits, 64, 48, 4, "float32", op)).fn()
            out = out[0] if isinstance(out, tuple) else out
            assert torch.isfinite(out).all()


class BaseBreaker(ReferenceImplementation):
    """An implementation whose ``create`` breaks the shared base layer, then raises (as PEFT's DoRA breaks an 8-bit
    CPU base at its first forward, docs/findings.md PEFT 15)."""

    name = "base-breaker"

    def create(self, base_layer: torch.nn.Module, spec: object) -> torch.nn.Module:
        base_layer.weight.quant_state = None
        raise RuntimeError("broke the base")


def test_a_failed_case_does_not_break_the_next_ones() -> None:
    """The failing implementation's row is an error of its own; the rows after it get a fresh base."""
    from conformance.bench import runner

    fwd = BenchCase.make("reference", "dora", 4, 64, 48, 4, "float32", "fwd")
    cases = [fwd.with_impl(f"{__name__}:BaseBreaker"), fwd, fwd.with_impl("floor")]
    recs = runner.time_cases(Builder("cpu"), cases, "cpu", quick=True, log=lambda _: None)
    assert [r["status"] for r in recs] == ["error", "ok", "ok"], [r.get("error") for r in recs]
    assert "broke the base" in recs[0]["error"]


# -- a tiny CPU run and what it reports ----------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_dora_doc() -> dict:
    from conformance.bench import runner

    pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runner.run(QUICK_DORA, "cpu", quick=True, log=lambda _: None, mem_shapes=[(256, 256)])


def test_a_tiny_cpu_run_produces_dora_rows(quick_dora_doc: dict) -> None:
    recs = {r["impl"] + "/" + r["op"]: r for r in quick_dora_doc["results"]}
    assert all(r["status"] == "ok" for r in recs.values()), [r.get("error") for r in recs.values()]
    assert set(recs) == {f"{impl}/{op}" for impl in IMPLS_DORA for op in OPS_RUN}
    for op in OPS_RUN:
        ref, peft = recs[f"reference/{op}"], recs[f"peft/{op}"]
        # measured and derived, never compared with a target: the figures exist and are what their records say
        assert ref["x_peft"] == ref["timing"]["median_s"] / peft["timing"]["median_s"]
        for r in (ref, peft):
            floor = recs[f"floor/{op}"]["timing"]["median_s"]
            assert r["x_measured_floor"] == r["timing"]["median_s"] / floor
            assert r["flops"] == roofline.flops(BenchCase.from_dict(r)) and r["flops"] > 0
        assert "x_measured_floor" not in recs[f"bnb/{op}"]  # its floor is floor-bare, not run for DoRA


def test_dora_ratios_are_reported_never_targets(quick_dora_doc: dict) -> None:
    rows = report.dora_ratios(quick_dora_doc)
    assert [r["group"].split("/")[1] for r in rows] == ["fwd", "fwdbwd"]
    for row in rows:
        assert row["x_peft"] == pytest.approx(row["reference_ms"] / row["peft_ms"])
        assert row["x_peft_ci"] > 0 and row["reference_x_floor"] is not None and row["peft_x_floor"] is not None
        assert "met" not in row and "target" not in row
    assert not [t for t in report.targets(quick_dora_doc) if "dora" in t["key"]]
    table = report.summary_table(quick_dora_doc)
    assert "DoRA, reference / PEFT (measured, no target):" in table
    assert all(row["group"] in table for row in rows)


def test_dora_figures_from_bf16_rows(quick_dora_doc: dict, tmp_path: Path) -> None:
    """The two DoRA figures are drawn from bfloat16 NF4+DQ rows (the GPU run's), and only those two."""
    pytest.importorskip("matplotlib")
    from conformance.bench import plot

    doc = json.loads(json.dumps(quick_dora_doc, default=str))
    for r in doc["results"]:
        r["dtype"] = "bfloat16"
        r["group"] = r["group"].replace("/float32", "/bfloat16")
        r["tokens"] = 4096  # a training micro-batch, as the floor figure draws (decode rows are left out there)
    made = plot.plot(doc, tmp_path / "d.png")
    assert [p.name for p in made] == ["d-dora-floor.png", "d-dora-vs-peft.png"]
    assert all(p.stat().st_size > 10_000 for p in made)
