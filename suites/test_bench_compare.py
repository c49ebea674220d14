"""CPU unit tests of the benchmark math: regression compare, roofline floors, bytes per parameter, timers."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from conformance.bench import compare, memory, roofline
from conformance.bench.cases import BenchCase, matrix, select
from conformance.bench.timing import Budget, Timing, ci_rel, time_host


# -- compare -----------------------------------------------------------------------------------------
def _run(median: float, rel_noise: float, rounds: int = 50, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [median * (1 + rng.gauss(0, rel_noise)) for _ in range(rounds)]


def _doc(samples_by_key: dict[str, list[float]]) -> dict:
    """A conformance-bench result document from raw samples."""
    results = []
    for key, s in samples_by_key.items():
        t = Timing(s)
        results.append({"key": key, "status": "ok", "timing": {"median_s": t.median, "iqr_s": t.iqr,
                                                               "rounds": t.rounds}})
    return {"format": "conformance-bench/1", "results": results}


def _stats(doc: dict) -> dict[str, compare.Stat]:
    return compare.load_stats(doc)


def test_same_code_does_not_fire() -> None:
    old = _doc({f"case{i}": _run(1e-3 * (i + 1), 0.03, seed=i) for i in range(20)})
    new = _doc({f"case{i}": _run(1e-3 * (i + 1), 0.03, seed=100 + i) for i in range(20)})
    verdicts = compare.compare([_stats(old)], [_stats(new)])
    assert not compare.regressions(verdicts), compare.format_table(verdicts)


def test_injected_ten_percent_fires() -> None:
    old = _doc({"ref": _run(1e-3, 0.03, seed=1), "other": _run(2e-3, 0.03, seed=2)})
    new = _doc({"ref": _run(1.1e-3, 0.03, seed=3), "other": _run(2e-3, 0.03, seed=4)})
    verdicts = {v.key: v for v in compare.compare([_stats(old)], [_stats(new)])}
    assert verdicts["ref"].status == "regression"
    assert verdicts["ref"].ratio == pytest.approx(1.1, abs=0.02)
    assert verdicts["other"].status != "regression"


def test_change_within_noise_is_not_a_regression() -> None:
    # 8% slower, but the rounds are so noisy (40%) and few that the change is not significant
    old = _doc({"noisy": _run(1e-3, 0.4, rounds=8, seed=5)})
    new = _doc({"noisy": [s * 1.08 for s in _run(1e-3, 0.4, rounds=8, seed=5)]})
    (v,) = compare.compare([_stats(old)], [_stats(new)])
    assert v.status == "noisy", v


def test_threshold_and_improvement() -> None:
    old = _doc({"a": _run(1e-3, 0.01, seed=6), "b": _run(1e-3, 0.01, seed=7)})
    new = _doc({"a": _run(1.04e-3, 0.01, seed=8), "b": _run(0.8e-3, 0.01, seed=9)})
    v = {x.key: x for x in compare.compare([_stats(old)], [_stats(new)], threshold=0.05)}
    assert v["a"].status == "same"  # 4% < 5% threshold even though significant
    assert v["b"].status == "improvement"
    v2 = {x.key: x for x in compare.compare([_stats(old)], [_stats(new)], threshold=0.02)}
    assert v2["a"].status == "regression"


def test_pooling_repeated_runs_uses_between_run_spread() -> None:
    # within-run noise is tiny, but the run medians scatter by ~10%: a 10% change is then not significant
    olds = [_stats(_doc({"k": _run(m, 0.001, seed=i)})) for i, m in enumerate((1.0e-3, 1.1e-3, 0.9e-3))]
    news = [_stats(_doc({"k": _run(m, 0.001, seed=10 + i)})) for i, m in enumerate((1.1e-3, 1.2e-3, 1.0e-3))]
    (v,) = compare.compare(olds, news)
    assert v.status == "noisy"
    pooled = compare.pool([s["k"] for s in olds])
    assert pooled.median == pytest.approx(statistics.median([1.0e-3, 1.1e-3, 0.9e-3]), rel=0.01)


def test_missing_and_new_cases() -> None:
    old = _doc({"gone": _run(1e-3, 0.01)})
    new = _doc({"added": _run(1e-3, 0.01)})
    v = {x.key: x.status for x in compare.compare([_stats(old)], [_stats(new)])}
    assert v == {"gone": "missing", "added": "new"}


def test_pytest_benchmark_format_and_cli_exit_codes(tmp_path) -> None:
    def pb(med: float) -> dict:
        s = _run(med, 0.02, seed=int(med * 1e6))
        t = Timing(s)
        return {"benchmarks": [{"name": "test_x[case]", "fullname": "suites/bench/x.py::test_x[case]",
                                "extra_info": {"key": "lora/fwd/ref"},
                                "stats": {"median": t.median, "iqr": t.iqr, "rounds": t.rounds}}]}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(pb(1e-3)))
    b.write_text(json.dumps(pb(1.001e-3)))
    c.write_text(json.dumps(pb(1.2e-3)))
    assert compare.load_stats(json.loads(a.read_text())).keys() == {"lora/fwd/ref"}
    assert compare.main([str(a), str(b)]) == 0
    assert compare.main([str(a), str(c)]) == 1
    assert compare.main(["--old", str(a), "--old", str(b), "--new", str(c)]) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert compare.main([str(a), str(bad)]) == 2


# -- timing ------------------------------------------------------------------------------------------
def test_timing_summary() -> None:
    t = Timing([1.0, 2.0, 3.0, 4.0, 100.0])
    s = t.summary()
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["max_s"] == 100.0 and s["rounds"] == 5
    assert ci_rel(1.0, 0.0, 10) == 0.0
    assert ci_rel(1.0, 0.1, 1) == float("inf")
    # more rounds, tighter interval
    assert ci_rel(1.0, 0.1, 100) < ci_rel(1.0, 0.1, 10)


def test_time_host_stops_at_target_and_caps() -> None:
    calls = []
    t = time_host(lambda: calls.append(1), Budget(warmup=2, min_rounds=5, max_rounds=7, max_seconds=5.0,
                                                  target_ci=0.0, flush_l2=False))
    assert t.rounds == 7 and len(calls) == 9  # warm-up calls are not timed


# -- roofline ----------------------------------------------------------------------------------------
def test_peak_table() -> None:
    h100 = roofline.peak_for("NVIDIA H100 80GB HBM3")
    assert h100 is not None and h100.flops == 989e12 and h100.bandwidth == 3.35e12
    assert roofline.peak_for("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert roofline.peak_for("Some Future GPU") is None
    assert roofline.peak_for(None) is None


def test_flops_bytes_and_peak_floor() -> None:
    c = BenchCase.make("reference", "lora", 4, 4096, 4096, 4096, "bfloat16", "fwd", double_quant=False)
    base = 2 * 4096**3
    assert roofline.flops(c) == base + 2 * 4096 * 16 * (4096 + 4096)
    assert roofline.flops(c.with_impl("bnb")) == base
    fb = BenchCase.make("reference", "lora", 4, 4096, 4096, 4096, "bfloat16", "fwdbwd", double_quant=False)
    assert roofline.flops(fb) == 2 * base + 3 * 2 * 4096 * 16 * 8192
    w = 4096 * 4096 / 2 + 4096 * 4096 / 64 * 4  # packed 4-bit + fp32 absmax per 64
    assert roofline.weight_bytes(c) == w
    assert roofline.min_bytes(c) == 4096 * 4096 * 2 * 2 + w
    peak = roofline.Peak("x", 1e15, 1e12)
    assert roofline.peak_floor_s(c, peak) == max(roofline.flops(c) / 1e15, roofline.min_bytes(c) / 1e12)
    decode = BenchCase.make("bnb", "lora", 4, 4096, 4096, 1, "bfloat16", "fwd")
    assert roofline.peak_floor_s(decode, peak) == roofline.min_bytes(decode) / 1e12  # memory-bound
    assert roofline.peak_floor_s(c, None) is None


def test_measured_floor_matches_autograd_on_cpu() -> None:
    """The hand-written floor computes the same gradient of x as autograd through the reference."""
    from conformance.bench.layers import Builder, lora_tensors, make_adapter_layer

    case = BenchCase.make("floor", "lora", 4, 64, 48, 5, "float32", "fwdbwd")
    base = Builder("cpu").base(case)
    layer = make_adapter_layer(case.with_impl("reference"), base)
    x = torch.randn(5, 64)
    g = torch.randn(5, 48)
    xr = x.clone().requires_grad_(True)
    layer(xr).backward(g)
    gx = roofline.floor_fn(case, base, x, g, lora_tensors(layer))()
    torch.testing.assert_close(gx, xr.grad, rtol=1e-4, atol=1e-5)


# -- memory ------------------------------------------------------------------------------------------
def test_theoretical_bits_match_qlora_paper() -> None:
    assert memory.theoretical_bits(4, 64, False)["total"] == 4.5
    assert memory.theoretical_bits(4, 64, True)["stats"] == pytest.approx(0.127, abs=1e-3)
    assert memory.double_quant_saving_bits() == pytest.approx(0.373, abs=1e-3)  # QLoRA sec. 3
    assert memory.theoretical_bits(8, in_features=4096)["total"] == pytest.approx(8 + 32 / 4096)
    # the common claim "4-bit allows 7B models on 8GB VRAM" -> ~3.4 GiB of NF4+DQ weights
    assert memory.model_gib(6.74e9, memory.theoretical_bits(4, 64, True)["total"]) < 4.0


@pytest.mark.parametrize("bits,dq", [(4, False), (4, True), (8, False)])
def test_measured_bytes_per_param(bits: int, dq: bool) -> None:
    from conformance.quant.layers import make_base_layer

    kw = {"double_quant": dq} if bits == 4 else {}
    layer = make_base_layer(512, 256, bits=bits, bias=False, **kw)
    m = memory.bytes_per_param(layer)
    theory = memory.theoretical_bits(bits, 64, dq, in_features=512)["total"]
    # code books (16 / 256 fp32 entries) and the offset are per layer: negligible at 131k params
    assert m["bits_per_param"] == pytest.approx(theory, abs=0.07)
    assert m["parts"]["weight"] == 512 * 256 * bits // 8


# -- cases -------------------------------------------------------------------------------------------
def test_matrix_keys_unique_and_select() -> None:
    full = matrix("cuda")
    assert len({c.key for c in full}) == len(full)
    assert {c.tokens for c in full if c.op == "fwd"} == {1, 512, 4096, 16384}
    sel = select(full, "fwdbwd/8192x28672,t16384,bfloat16")
    assert sel and all("8192x28672" in c.key and "t16384" in c.key for c in sel)
    quick = matrix("cpu", quick=True)
    assert all(c.in_features * c.out_features <= 256 * 256 for c in quick)


def test_normalize_cancels_machine_drift_but_not_a_slowdown() -> None:
    # the whole machine is 40% slower in the new run (load), and the reference 10% on top of that
    old = _doc({"g/bnb": _run(1e-3, 0.02, seed=20), "g/reference": _run(2e-3, 0.02, seed=21),
                "g/peft": _run(3e-3, 0.02, seed=22)})
    new = _doc({"g/bnb": _run(1.4e-3, 0.02, seed=23), "g/reference": _run(2e-3 * 1.4 * 1.1, 0.02, seed=24),
                "g/peft": _run(3e-3 * 1.4, 0.02, seed=25)})
    raw = {v.key: v.status for v in compare.compare([_stats(old)], [_stats(new)])}
    assert raw["g/peft"] == "regression"  # absolute times see the drift everywhere
    norm = {v.key: v for v in compare.compare([compare.normalize(_stats(old), "bnb")],
                                              [compare.normalize(_stats(new), "bnb")])}
    assert set(norm) == {"g/reference", "g/peft"}
    assert norm["g/peft"].status != "regression"
    assert norm["g/reference"].status == "regression" and norm["g/reference"].ratio == pytest.approx(1.1, abs=0.03)


def test_stored_bench_records_read_back_as_cases() -> None:
    """Every record of a stored benchmark reads back (``BenchCase.from_dict``) as the case it was: same key, group
    and flat fields; the current GPU matrix is the stored one, key for key (a baseline stays comparable)."""
    root = Path(__file__).resolve().parent.parent / "baselines" / "bench"
    files = [f for f in sorted(root.glob("*.json")) if "results" in json.loads(f.read_text())]
    assert files
    for f in files:
        for r in json.loads(f.read_text())["results"]:
            case = BenchCase.from_dict(r)
            assert case.to_dict() == {k: r[k] for k in case.to_dict()}, (f.name, r["key"])
    stored = json.loads(files[-1].read_text())["results"]
    assert [c.key for c in matrix("cuda")] == [r["key"] for r in stored]
