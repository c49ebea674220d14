"""The clone probe: it detects failures (fake bases), summarises them, compares with a baseline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conformance.clauses import cases
from conformance.probe import clone, clone_report

BASELINES = Path(__file__).resolve().parent.parent / "baselines" / "clone_probe"



class _ViewOut(torch.autograd.Function):
    """Returns its result as a view created inside the Function: torch forbids in-place updates on it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        out = torch.nn.functional.linear(x, w, b)
        return out.view(out.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return g @ w, None, None


class _UnsafeSave(torch.autograd.Function):
    """Keeps its output outside save_for_backward (no version check) and reads it in backward:
    an in-place update on the output silently changes the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.nn.functional.linear(x, w, b)
        ctx.w, ctx.out, ctx.ref = w, out, out.detach().clone()
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        drift = (ctx.out.detach().double() - ctx.ref.double()).abs().sum()
        return (g @ ctx.w) * (1 + drift).to(g.dtype), None, None


class FakeBase(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function], dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = (torch.randn(cases.GRAD_OUT_FEATURES, cases.GRAD_IN_FEATURES, generator=gen) / 8).to(dtype)
        self.b = (0.1 * torch.randn(cases.GRAD_OUT_FEATURES, generator=gen)).to(dtype)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x, self.w, self.b)


def factory(fn: type[torch.autograd.Function]) -> Any:
    def make(case: cases.BaseCase, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        base = FakeBase(fn, case.compute_dtype)
        return base, base.w.double(), base.b.double()
    return make


def fake_cases(modes: tuple[str, ...] = ("grad", "no_grad")) -> list[clone.ProbeCase]:
    out = []
    base = cases.grad_base(4, "fake", torch.float32)
    for mode in modes:
        for t in clone.SINGLE_TECHNIQUES:
            out.append(clone.ProbeCase(base, 2, 3, True, mode, "single", t))
        for t in clone.MIXED_TECHNIQUES:
            out.append(clone.ProbeCase(base, 2, 3, True, mode, "mixed", t))
    return out


def test_probe_detects_raise_on_custom_function_view() -> None:
    report = clone.run_probe(cases=fake_cases(), base_factory=factory(_ViewOut))
    by = {(c["mode"], c["technique"]): c for c in report["cases"]}
    for t in (*clone.SINGLE_TECHNIQUES, *clone.MIXED_TECHNIQUES):
        grad = by[("grad", t)]
        assert grad["uncloned"]["outcome"] == "raises", grad
        assert grad["uncloned"]["phase"] == "in-place update"
        assert "is a view and is being modified inplace" in grad["uncloned"]["error"]
        assert grad["cloned"]["outcome"] == "works" and grad["clone_required"]
        assert by[("no_grad", t)]["uncloned"]["outcome"] == "works"  # the view check is a grad-mode check
    v = report["verdict"]
    assert v["clone_required"] and v["line"].startswith("clone still required for: ")
    assert len(v["required"]) == len(clone.SINGLE_TECHNIQUES) + len(clone.MIXED_TECHNIQUES)
    assert "mode=grad" in v["line"] and "quant=fake" in v["line"]


def test_probe_detects_wrong_gradients() -> None:
    report = clone.run_probe(cases=fake_cases(("grad",)), base_factory=factory(_UnsafeSave))
    for c in report["cases"]:
        assert c["uncloned"]["outcome"] == "wrong", c
        assert "grad x" in c["uncloned"]["error"]
        assert c["cloned"]["outcome"] == "works" and c["clone_required"]
    assert report["verdict"]["clone_required"]


def test_probe_reports_not_required_when_everything_works() -> None:
    cases = [c for c in clone.matrix((4,)) if c.quant == "nf4" and c.dtype == "float32" and c.rank == 2]
    report = clone.run_probe(cases=cases)
    assert report["schema_version"] == clone.SCHEMA_VERSION
    assert {"packages", "device", "python"} <= set(report["environment"])
    assert all(c["uncloned"]["outcome"] == "works" for c in report["cases"])
    assert report["verdict"]["line"].startswith("not required in any case on torch ")


def test_collapse_summarises_full_factor_groups() -> None:
    rows = clone.matrix((4,))
    universe = [c.to_json() for c in rows]
    failing = [u for u in universe if u["mode"] == "grad" and u["rank"] == 3]
    pats = clone_report.collapse(failing, universe)
    assert all(p["mode"] == "grad" and p["rank"] == 3 for p in pats)
    assert all(p["dtype"] == "*" and p["quant"] == "*" and p["technique"] == "*" for p in pats)


def _report(outcome: str) -> dict[str, Any]:
    return {"cases": [{"id": "c1", "uncloned": {"outcome": outcome}, "cloned": {"outcome": "works"}}],
            "verdict": {"line": outcome}}


def test_compare_flags_regressions_only() -> None:
    lines, regressed = clone.compare(_report("raises"), _report("works"))
    assert regressed and any("works -> raises" in line for line in lines)
    lines, regressed = clone.compare(_report("works"), _report("raises"))
    assert not regressed and any("raises -> works" in line for line in lines)
    assert clone.compare(_report("works"), _report("works")) == ([], False)


def test_cli_compare_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    clone.add_arguments(parser)
    out = tmp_path / "now.json"
    assert clone.run(parser.parse_args(["--bits", "8", "--quiet", "--json", str(out)])) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"schema_version", "environment", "cases", "verdict"}
    # pretend a case that raises now used to work: --compare must exit 1 and name it
    raising = [c for c in report["cases"] if c["uncloned"]["outcome"] == "raises"]
    assert raising, "int8 raw outputs for 1-D/3-D inputs are views on torch 2.13 CPU"
    raising[0]["uncloned"] = {"outcome": "works"}
    base = tmp_path / "base.json"
    base.write_text(json.dumps(report))
    assert clone.run(parser.parse_args(["--bits", "8", "--quiet", "--compare", str(base)])) == 1
    assert raising[0]["id"] in capsys.readouterr().out


def test_saved_cpu_baseline_is_well_formed() -> None:
    files = sorted(BASELINES.glob("cpu-torch*-bnb*.json"))
    assert files, f"no CPU baseline under {BASELINES}"
    report = json.loads(files[-1].read_text())
    assert report["schema_version"] == clone.SCHEMA_VERSION
    assert len(report["cases"]) == len(clone.matrix())
    assert report["verdict"]["line"]


def test_stored_baselines_read_back_as_cases() -> None:
    """Every stored probe report's cases read back as ``ProbeCase`` records with the same id and factors, and
    the current matrix has the ids of the stored CPU one (a baseline stays comparable)."""
    files = sorted(BASELINES.glob("*.json"))
    assert files
    for f in files:
        for rec in json.loads(f.read_text())["cases"]:
            case = clone.ProbeCase.from_json(rec)
            assert case.id == rec["id"], f
            assert case.to_json() == {k: rec[k] for k in case.to_json()}, f
    stored = json.loads(sorted(BASELINES.glob("cpu-torch*-bnb*.json"))[-1].read_text())["cases"]
    assert [c.id for c in clone.matrix()] == [r["id"] for r in stored]
