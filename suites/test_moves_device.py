"""MOVE-DEVICE (area ``moves``): device moves of an adapter layer after a CPU eval forward.

``suites/test_moves.py`` binds the area's broken-twin tests (the clause passes on the reference, fails on
``move-rounds-absmax``); these pin what the clause runs where, and both ways out of a move: a clean refusal passes,
a refusal that changed the layer fails. The CUDA half runs only under ``--device cuda`` on a CUDA host.
"""

from __future__ import annotations

import copy
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conformance.clauses import cases
from conformance.clauses.broken import Broken, bind
from conformance.clauses.clause import get
from conformance.clauses.interface import AdapterSpec
from conformance.clauses.moves.cases import BACK_TO_CPU, TO_CPU, TO_CUDA, device_move_cases
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import layers as qlayers

ROOT = Path(__file__).resolve().parents[1]
CLAUSE = get("MOVE-DEVICE")


@pytest.fixture(scope="module")
def reference_result() -> Any:
    return run_clause(CLAUSE, ReferenceImplementation())


def test_the_bases_cover_the_axes_the_clause_names() -> None:
    four, eight = device_move_cases(4), device_move_cases(8)
    assert {c.quant_type for c in four} == set(cases.QUANT_TYPES)
    assert {c.double_quant for c in four} == {False, True}
    assert {c.quant_storage or torch.uint8 for c in four} == set(cases.QUANT_STORAGES)
    assert {c.cpu_packed for c in four} == {False, True}
    assert {c.threshold for c in eight} == {0.0, cases.INT8_THRESHOLD}
    for c in four:
        if c.cpu_packed:  # a shape bitsandbytes repacks, with more than one block per row (the inverse's weak spot)
            assert c.cpu_pack_refusal is None and c.in_features // c.blocksize >= 2


def test_the_moves_name_what_they_do() -> None:
    m = nn.Linear(2, 2)
    for move in TO_CPU.values():
        assert move(m) is m and m.weight.device.type == "cpu"
    assert set(BACK_TO_CPU) <= set(TO_CPU) and len(TO_CUDA) == 3


def test_reference_runs_the_cpu_round_trip_and_skips_cuda_with_a_reason(reference_result: Any) -> None:
    res = reference_result
    assert res.outcome == "passed", res.message
    n_cpu = len(TO_CPU)
    for fam, f in res.families.items():
        bits = int(fam.split("/")[1].removesuffix("bit"))
        bases = device_move_cases(bits)
        runnable = [c for c in bases if c.unavailable("cpu") is None]
        assert f.run == len(runnable) * n_cpu, (fam, f)
        reasons = " | ".join(f.skip_reasons)
        assert f.skipped == len(bases) * (n_cpu + len(TO_CUDA)) - f.run, (fam, f)
        assert "--device cuda" in reasons, reasons  # this run is on the CPU: no CUDA move ran, and it says so
        if len(runnable) < len(bases):
            assert "packed layout" in reasons, reasons
    assert res.measurements["ratio.4bit.cpu"] <= 1.0 and res.measurements["ratio.8bit.cpu"] <= 1.0


def _refusing(change_first: bool) -> Broken:
    def patch(layer: nn.Module, spec: AdapterSpec) -> None:
        def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
            if change_first:  # the bug: it rewrites the payload, then refuses
                self.base_layer.weight.data.view(torch.uint8).reshape(-1)[0] ^= 1
            raise NotImplementedError("moving a bitsandbytes 4-bit/8-bit quantized layer is not supported; "
                                      "build it on the device instead")

        bind(layer, "_apply", _apply)

    return Broken("refuses-moves" + ("-after-changing" if change_first else ""), patch)


def test_a_clean_refusal_passes() -> None:
    res = run_clause(CLAUSE, _refusing(False))
    assert res.outcome == "passed", res.message
    assert res.measurements["refused"] > 0


def test_a_refusal_that_changed_the_layer_fails() -> None:
    res = run_clause(CLAUSE, _refusing(True))
    assert res.outcome == "failed" and "refused, but the layer was changed (weight" in res.message, res.message


def test_the_check_reads_a_packed_base_in_the_standard_layout() -> None:
    """The clause compares what a CPU-packed base means (``quant.layers.dequantize`` through ``standard_layout``):
    a repack (done here by the function bitsandbytes' forward calls) keeps it bit for bit, the raw bytes do not."""
    base = qlayers.make_base_layer(128, 64, double_quant=True)
    w, before = qlayers.dequantize(base), qlayers.snapshot(base)
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(base.weight.data,
                                                                               base.weight.quant_state)
    assert qlayers.is_cpu_packed(base) and qlayers.snapshot(base).differences(before)
    # the packed kernel multiplies by the bfloat16 absmax: within its rounding of the original weight
    assert (qlayers.dequantize(base) - w).abs().max() <= w.abs().max() * 2**-8


def test_the_cuda_inverse_reproducer_exits_1_here(capsys: pytest.CaptureFixture[str]) -> None:
    """bitsandbytes 0.50.2 ``Params4bit.cuda`` turns a CPU-packed weight back in place before the transfer, lossily;
    the reproducer shows it with bitsandbytes and torch only, also on a CPU without CUDA or AVX512-BF16."""
    import bitsandbytes as bnb

    if not bnb.__version__.startswith("0.50."):
        pytest.skip(f"the reproducer is written for bitsandbytes 0.50.x, not {bnb.__version__}")
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "xfails/bitsandbytes/cpu_packed_cuda_inverse.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 1, out
    assert "reproduced" in out


@pytest.mark.parametrize("script", ["int8_state_cuda.py", "int8_fp16_weights_to_device.py", "compile_bias_cast.py"])
def test_the_cuda_reproducers_say_when_they_cannot_run(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: run the reproducer itself (nox -s gpu)")
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "xfails/bitsandbytes" / script), run_name="__main__")
    assert done.value.code == 2 and "not reproducible here" in capsys.readouterr().out


@pytest.mark.parametrize("case", [cases.BaseCase(4, double_quant=True), cases.BaseCase(4, quant_type="fp4",
                                                                                       quant_storage=torch.float16),
                                  cases.BaseCase(8, threshold=cases.INT8_THRESHOLD),
                                  cases.BaseCase(8, has_fp16_weights=True)], ids=lambda c: c.label)
def test_the_weight_read_on_the_cpu_is_the_dequantized_weight(case: cases.BaseCase) -> None:
    """What the clause compares before and after a move is ``quant.layers.dequantize``'s reading, made on the CPU
    from copies (``on="cpu"``: the same kernel on both sides of a CPU<->CUDA move), and reading it changes nothing."""
    base = case.build()
    before = qlayers.snapshot(base)
    state_before = copy.deepcopy(getattr(base.weight, "quant_state", None))
    assert torch.equal(qlayers.dequantize(base, on="cpu"), qlayers.dequantize(base))
    assert qlayers.snapshot(base).differences(before) == []
    if state_before is not None:  # the quant state itself is not moved or replaced
        assert base.weight.quant_state.absmax.device == state_before.absmax.device
