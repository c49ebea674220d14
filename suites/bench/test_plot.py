"""The benchmark figures: one per question, from a stored result, named for what they show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from conformance.bench import plot  # noqa: E402

H100 = Path(__file__).resolve().parents[2] / "baselines" / "bench" / "nvidia-h100-80gb-hbm3-torch2.11.0-bnb0.50.2.json"


def test_a_stored_result_gives_the_three_figures(tmp_path: Path) -> None:
    made = plot.plot(json.loads(H100.read_text()), tmp_path / "r.png")
    assert [p.name for p in made] == ["r-floor.png", "r-vs-peft.png", "r-memory.png"]
    assert all(p.stat().st_size > 10_000 for p in made)


def test_ratio_error_combines_both_spreads() -> None:
    num = {"timing": {"median_s": 2.0, "ci_rel": 0.03}}
    den = {"timing": {"median_s": 1.0, "ci_rel": 0.04}}
    ratio, err = plot.ratio_with_error(num, den)
    assert ratio == 2.0 and err == pytest.approx(2.0 * 0.05)


def test_tick_labels_are_short() -> None:
    assert plot.short("4096x11008") == "4k×11k" and plot.short("256x300") == "256x300".replace("x", "×")


def test_hardware_names_the_gpu() -> None:
    doc = {"environment": {"device": "cuda", "gpu": {"name": "NVIDIA H200"}, "packages": {"torch": "2.11.0"}}}
    assert plot.hardware(doc).startswith("NVIDIA H200")


def test_nothing_to_draw_draws_nothing(tmp_path: Path) -> None:
    assert plot.plot({"results": []}, tmp_path / "e.png") == []
