"""Graph-mode decode benchmark: its bookkeeping on the CPU, capture and replay on CUDA."""

from __future__ import annotations

import pytest

from conformance.bench import decode_graph as dg


def _rec(shape: str, impl: str, eager: float | None, graph: float | None) -> dict:
    return {"shape": shape, "impl": impl, "dtype": "bfloat16", "eager_us": eager, "graph_us": graph}


def test_ratios_are_against_the_bare_layer_of_the_same_shape() -> None:
    rows = dg.ratio_rows([_rec("a", "bnb", 10.0, 5.0), _rec("a", "reference", 30.0, 10.0),
                          _rec("b", "bnb", 20.0, 8.0), _rec("b", "peft", 40.0, 12.0)])
    by = {(r["shape"], r["impl"]): r for r in rows}
    assert by[("a", "reference")]["eager_vs_bnb"] == 3.0 and by[("a", "reference")]["graph_vs_bnb"] == 2.0
    assert by[("b", "peft")]["eager_vs_bnb"] == 2.0 and by[("b", "peft")]["graph_vs_bnb"] == 1.5
    assert by[("a", "bnb")]["graph_vs_bnb"] == 1.0


def test_a_failed_capture_has_no_ratio_and_shows_its_error() -> None:
    rec = _rec("a", "peft", 30.0, None) | {"error": "capture failed: RuntimeError: x"}
    rows = dg.ratio_rows([_rec("a", "bnb", 10.0, 5.0), rec])
    assert rows[1]["graph_vs_bnb"] is None and rows[1]["eager_vs_bnb"] == 3.0
    assert "capture failed" in dg.table(rows)


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        dg.main(["--impls", "bnb,nope"])
    assert exc.value.code == 2
    assert "unknown implementation(s) ['nope']" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["bnb", "reference", "peft"])
def test_graph_replay_gives_the_eager_output(impl: str) -> None:
    recs = dg.run([(256, 512)], ["bnb", impl] if impl != "bnb" else ["bnb"], progress=lambda m: None)
    rec = recs[-1]
    assert "error" not in rec, rec
    assert rec["graph_matches_eager"] is True
    assert rec["graph_us"] > 0 and rec["eager_us"] > 0
