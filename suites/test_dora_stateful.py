"""Stateful conformance for DoRA: the machine runs DoRA with DoRA's model (not LoRA's), the reference passes, broken
DoRA layers are caught, and a method no step can run for does not pass on the other methods' steps.

The broken implementations are in ``conformance.clauses.stateful.broken`` (``DoraIgnoresMagnitude``: a DoRA layer
that computes LoRA; ``DoraUnmergeRecomputesNorm``: an unmerge without the merge's norm; ``DoraCreateRaises``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import conformance
from conformance import numerics
from conformance.clauses.cases import DORA_MAGNITUDE
from conformance.clauses.stateful import checks, ops, shrink
from conformance.clauses.stateful import config as sc
from conformance.clauses.stateful import run as sr
from conformance.clauses.stateful.broken import (
    DoraCreateRaises,
    DoraIgnoresMagnitude,
    DoraUnmergeRecomputesNorm,
    _Broken,
)
from conformance.clauses.stateful.declare import (
    ADAPTERS,
    BASE,
    DRIFT,
    FLAGS,
    MERGE,
    OUTPUT,
    STATE_IDS,
    UNMERGE,
    VALID,
)
from conformance.clauses.stateful.driver import Driver
from conformance.clauses.stateful.model import AdapterModel, Chain, apply_op
from conformance.clauses.stateful.reproducer import load_steps
from conformance.impls.reference import ReferenceImplementation
from conformance.numerics import dora as ndora

_RUNS: dict[Any, sr.RunResult] = {}


def _ref_run() -> sr.RunResult:
    """The reference over dora/4bit and dora/8bit under the CI budget (derandomized), made once."""
    if "ref" not in _RUNS:
        _RUNS["ref"] = sr.run(ReferenceImplementation(), cases=[("dora", 4), ("dora", 8)])
    return _RUNS["ref"]


def test_reference_dora_passes_and_reaches_every_dora_invariant() -> None:
    """Every STATE-* clause for DoRA alone: no violation, each case above each clause's floor on its own, and the
    steps that check DoRA's own math ran in both cases (forwards and training with several adapters, merges and
    unmerges)."""
    res = _ref_run()
    assert not res.errors and not res.failures, res.summary()
    assert set(res.case_stats) == {"dora/4bit", "dora/8bit"}
    for cid in STATE_IDS:
        assert checks.shortfall(cid, res) is None, (cid, checks.shortfall(cid, res))
    for label, s in res.case_stats.items():
        for op in ("forward", "train_step", "merge", "unmerge", "add_adapter", "set_adapter", "dtype_move",
                   "state_dict_roundtrip", "poison_safe_merge"):
            assert s.ops.get(op, 0) > 0, (label, op, s.ops)
        for cid, floor in ((OUTPUT, 10), (MERGE, 3), (UNMERGE, 1), (DRIFT, 3)):
            assert sum(s.reached.get(cid, {}).values()) >= floor, (label, cid, s.reached.get(cid))
        assert "mixed_forward" not in s.ops  # DoRA declares no mixed batch (limitation, as PEFT)
    assert ops.DORA_MERGES_ONE in res.stats.notes


def test_dora_variants_are_loras_without_lora_bias() -> None:
    assert sc.variants("dora") == tuple(v for v in sc.LORA_VARIANTS if not v.get("lora_bias"))
    assert all(v["init_lora_weights"] is False for v in sc.variants("dora"))
    with pytest.raises(ValueError, match="no adapter variants for method 'nope'"):
        sc.variants("nope")
    assert ops.ADAPTER_DTYPES["dora"] == ops.ADAPTER_DTYPES["lora"]


def test_the_machine_moves_the_magnitude_off_its_init() -> None:
    """A fresh DoRA adapter's factor m/n is 1 up to rounding (LoRA's output); the machine moves it at create and at
    add_adapter (rendered with the step), so DoRA's model and LoRA's differ."""
    cfg = sc.MachineConfig.make("dora", 4, 32, 24, "nf4", True, 32, variant=0, seed=3)
    d = Driver(ReferenceImplementation(), cfg)
    ops.run_step(d, {"op": "add_adapter", "name": "a1", "variant": 1, "params": dict(sc.variants("dora")[1]),
                     "seed": 5, "method": "dora"})
    w0 = numerics.base_weights(d.layer.base_layer)[0]
    for name in ("a0", "a1"):
        t = d.model.adapters[name].tensors
        s = numerics.lora_scaling(d.model.adapters[name].params)
        f = t[DORA_MAGNITUDE].double() / ndora.weight_norm(w0, t["lora_A.weight"].double(), t["lora_B.weight"].double(),
                                                           s)
        assert float((f - 1).abs().max()) > 0.1, (name, f)
    assert "lora_magnitude_vector.weight" in ops.render_step(d.trace[0])
    assert "lora_magnitude_vector.weight" in ops.render_step(d.trace[-1])


def test_dora_merge_then_unmerge_is_exact_in_the_chain_and_bounded() -> None:
    """The model's DoRA merge takes the factor on the chain's weights and keeps it; the unmerge divides by it: the
    exact weights come back (float64), and the bound is finite and of the order of float32 rounding."""
    torch.manual_seed(0)
    w = torch.randn(24, 32, dtype=torch.float64)
    t = {"lora_A.weight": torch.randn(4, 32) * 0.1, "lora_B.weight": torch.randn(24, 4) * 0.1,
         DORA_MAGNITUDE: torch.rand(24) + 4.0}
    ad = AdapterModel("dora", {"r": 4, "lora_alpha": 8.0}, t)
    base = torch.nn.Linear(32, 24)
    c0 = Chain.start(w, None)
    c1 = apply_op(c0, w, None, ad, +1, base, name="a0")
    assert "a0" in c1.factors and "a0" not in c0.factors
    exact, err, _ = ndora.dora_merge_error(w, t, numerics.lora_scaling(ad.params))
    assert torch.allclose(c1.w, exact, rtol=0, atol=1e-12)
    assert torch.all(c1.ew >= err * (1 - 1e-12))  # the merge clauses' bound, and the factor's
    c2 = apply_op(c1, c1.w, None, ad, -1, base, name="a0")
    assert not c2.factors
    assert float((c2.w - w).abs().max()) < 1e-12
    assert math.isfinite(float(c2.ew.max())) and float((c2.ew / (w.abs() + 1)).max()) < 1e-5


def _run_twin(impl: _Broken, tmp_path: Any, cases: list[tuple[str, int]]) -> sr.RunResult:
    key = (type(impl), tuple(cases))
    if key not in _RUNS:
        _RUNS[key] = sr.run(impl, examples=30, steps=12, cases=cases, out=str(tmp_path), shrink_s=5, seed=0)
    return _RUNS[key]


@pytest.mark.parametrize(("impl", "clauses"), [
    (DoraIgnoresMagnitude(), {OUTPUT, MERGE}),
    (DoraUnmergeRecomputesNorm(), {MERGE}),  # the unmerge call itself is off: the example ends there
], ids=lambda v: type(v).__name__ if isinstance(v, _Broken) else "")
def test_broken_dora_layer_caught(impl: _Broken, clauses: set[str], tmp_path: Any) -> None:
    """A DoRA layer that computes LoRA fails (the model is DoRA's, not LoRA's), and so does an unmerge without the
    merge's norm; each minimal sequence replays to its violation."""
    res = _run_twin(impl, tmp_path, [("dora", 4)])
    found = set(res.failures)
    assert clauses <= found, f"expected {clauses}, got {sorted(found)}\n{res.summary()}"
    for cid in clauses:
        for f in res.failures[cid]:
            cfg, steps = load_steps(f.reproducer)
            assert cfg == f.config and cfg["method"] == "dora"
            v = shrink.replay(impl, cfg, steps)
            assert v is not None and v.clause == f.clause, (f.clause, v)


def test_a_method_whose_examples_all_end_at_create_does_not_pass_on_the_others(tmp_path: Any) -> None:
    """The vacuous pass this guards against: DoRA's layers could not be built, every DoRA example ended at its
    first step, and the pooled counts of the LoRA case met every floor. Each case's steps must reach each clause's
    invariant as often as its floor asks, on their own."""
    res = _run_twin(DoraCreateRaises(), tmp_path, [("lora", 4), ("dora", 4)])
    assert set(res.failures) == {VALID}, res.summary()
    assert all(f.config["method"] == "dora" for f in res.failures[VALID])
    for cid in (OUTPUT, BASE, FLAGS, MERGE, ADAPTERS):
        why = checks.shortfall(cid, res)
        assert why is not None and "case dora/4bit" in why, (cid, why)
        assert "case lora/4bit" not in why, (cid, why)


@pytest.mark.e2e
def test_a_dora_reproducer_runs(tmp_path: Any) -> None:
    """The script written for a DoRA failure runs from anywhere and shows the divergence (exit 1)."""
    target = "conformance.clauses.stateful.broken:DoraIgnoresMagnitude"
    from conformance.harness.loader import load

    impl = load(target)
    res = sr.run(impl, examples=20, steps=8, cases=[("dora", 8)], out=str(tmp_path), shrink_s=3, target=target, seed=0)
    assert res.failures, res.summary()
    f = next(iter(res.failures.values()))[0]
    text = Path(f.reproducer).read_text(encoding="utf-8")
    assert "AdapterSpec('dora'" in text and "lora_magnitude_vector.weight" in text
    root = str(Path(conformance.__file__).resolve().parents[1])
    env = dict(os.environ, BITSANDBYTES_NOWELCOME="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, f.reproducer], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIVERGENCE" in proc.stdout, proc.stdout


def test_a_training_step_trains_the_magnitude_too() -> None:
    """The machine's training step optimizes every adapter parameter with a gradient: DoRA's magnitude moves with
    A and B (the norm is detached, the magnitude is not), and the model adopts the new tensors."""
    cfg = sc.MachineConfig.make("dora", 8, 32, 24, variant=0, seed=1)
    d = Driver(ReferenceImplementation(), cfg)
    before = {k: v.clone() for k, v in d.model.adapters["a0"].tensors.items()}
    ops.run_step(d, {"op": "train_step", "lead": [3], "seed": 4, "lr": ops.LR, "max_norm": ops.MAX_GRAD_NORM})
    d.check_invariants()
    after = d.model.adapters["a0"].tensors
    for k in ("lora_A.weight", "lora_B.weight", DORA_MAGNITUDE):
        assert not after[k].equal(before[k]), k
