"""Stateful conformance (issue #8): the machine passes for the reference, catches broken layers,
and writes runnable reproducers.

The broken implementations are defined here; reproducers import them as ``test_stateful:NAME``
(the script puts this folder on ``sys.path``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import conformance
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import layers as ql
from conformance.reference import layer_class
from conformance.spec.clauses import registry
from conformance.spec.interface import AdapterSpec
from conformance.spec.stateful import machine as sm
from conformance.spec.stateful.reproducer import load_steps

STATE_CLAUSES = [c for c in registry().values() if c.area == "stateful"]


# -- deliberately broken implementations ---------------------------------------------------------

class _UnmergeForgetsRequantize:
    """unmerge() clears the bookkeeping but never writes the weights back."""

    def unmerge(self) -> None:
        self.merged_adapters.clear()


class _MergeForgetsFlags:
    """merge() rewrites the weights but leaves merged_adapters empty."""

    def merge(self, safe_merge: bool = False, adapter_names: Any = None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.merged_adapters.clear()


class _DeepcopyLosesAdapter:
    """copy.deepcopy drops the most recently added adapter (when there are several)."""

    def __deepcopy__(self, memo: dict) -> nn.Module:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        if len(new.adapter_names) > 1:
            last = new.adapter_names[-1]
            new._drop_adapter(last)
            new.active_adapters = [n for n in new.active_adapters if n != last] or new.adapter_names[:1]
        return new


class _SilentUnknownAdapter:
    """set_adapter() accepts unknown names silently (what a layer without validation does)."""

    def set_adapter(self, adapter_names: Any) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = names


_CLASSES: dict[tuple[type, type], type] = {}


class _Broken(ReferenceImplementation):
    mixin: type = object

    def __init__(self) -> None:
        super().__init__()
        self.name = f"broken-{type(self).__name__}"

    def create(self, base_layer: nn.Module, spec: AdapterSpec) -> nn.Module:
        layer = super().create(base_layer, spec)
        key = (self.mixin, type(layer))
        if key not in _CLASSES:
            _CLASSES[key] = type(f"{self.mixin.__name__.strip('_')}{type(layer).__name__}", key, {})
        layer.__class__ = _CLASSES[key]
        return layer


class UnmergeForgetsRequantize(_Broken):
    mixin = _UnmergeForgetsRequantize


class MergeForgetsFlags(_Broken):
    mixin = _MergeForgetsFlags


class DeepcopyLosesAdapter(_Broken):
    mixin = _DeepcopyLosesAdapter


class SilentUnknownAdapter(_Broken):
    mixin = _SilentUnknownAdapter


# -- the reference passes --------------------------------------------------------------------------

def test_reference_ci_budget_passes() -> None:
    """The CI budget (derandomized) finds nothing in the reference and stays well under 60 s."""
    start = time.perf_counter()
    res = sm.run(ReferenceImplementation())
    wall = time.perf_counter() - start
    assert not res.failures and not res.errors, res.summary()
    assert res.stats.examples >= 4 * sm.DEFAULT_EXAMPLES // 2, res.summary()
    for op in ("forward", "merge", "unmerge", "train_step", "state_dict_roundtrip", "deepcopy", "invalid"):
        assert res.stats.ops.get(op, 0) > 0, f"the CI budget never ran {op}: {res.summary()}"
    for cid in (sm.OUTPUT, sm.MERGE, sm.UNMERGE, sm.DRIFT):
        assert 0 < res.stats.worst[cid] <= 1, (cid, res.stats.worst)
    assert wall < 60, f"CI budget took {wall:.1f}s"


def test_stateful_clauses_registered_and_pass_for_reference() -> None:
    ids = {c.id for c in STATE_CLAUSES}
    assert set(sm.CLAUSE_IDS) <= ids
    impl = ReferenceImplementation()
    for c in STATE_CLAUSES:
        res = run_clause(c, impl)
        assert res.outcome == "passed", f"{c.id}: {res.outcome} {res.message}"
        assert res.measurements["examples"] > 0


def test_fixed_sequence_reference() -> None:
    """A hand-written sequence through every kind of step (no hypothesis): no violation."""
    cfg = {"method": "lora", "bits": 4, "in_features": 64, "out_features": 40, "quant_type": "nf4",
           "double_quant": True, "blocksize": 64, "bias": True, "variant": 2, "seed": 3}
    steps = [
        {"op": "forward", "lead": [2, 3], "dtype": "bfloat16", "grad_mode": "inference_mode", "seed": 1},
        {"op": "add_adapter", "variant": 1, "seed": 4},
        {"op": "set_adapter", "adapter_names": ["a0", "a1"]},
        {"op": "train_step", "lead": [3], "seed": 2},
        {"op": "merge", "adapter_names": ["a1", "a0"], "safe_merge": True},
        {"op": "invalid", "kind": "merge_merged", "seed": 0},
        {"op": "forward", "lead": [3], "dtype": "float16", "grad_mode": "no_grad", "seed": 5},
        {"op": "unmerge"},
        {"op": "merge", "adapter_names": None, "safe_merge": False},
        {"op": "enable_adapters", "enabled": False},
        {"op": "forward", "lead": [1], "dtype": "float32", "grad_mode": "grad", "seed": 6},  # unmerges
        {"op": "enable_adapters", "enabled": True},
        {"op": "mixed_forward", "adapter_names": ["a1", "__base__", "a0"], "dtype": "float32", "seed": 7},
        {"op": "dtype_move", "dtype": "bfloat16"},
        {"op": "state_dict_roundtrip", "seed": 9},
        {"op": "deepcopy"},
        {"op": "set_mode", "training": False},
        {"op": "forward", "lead": [3], "dtype": "float32", "grad_mode": "no_grad", "seed": 8},
        {"op": "delete_adapter", "name": "a1"},
        {"op": "invalid", "kind": "unmerge_unmerged", "seed": 0},
        {"op": "invalid", "kind": "set_unknown", "seed": 0},
    ]
    seen: list[str] = []
    v = sm.replay(ReferenceImplementation(), cfg, steps, verbose=seen.append)
    assert v is None, f"{v.clause}: {v.message}"
    assert len(seen) == len(steps) + 1


# -- broken layers are caught ------------------------------------------------------------------------

_BROKEN_RUNS: dict[type, sm.RunResult] = {}


def _run_broken(impl: _Broken, tmp_path: Any) -> sm.RunResult:
    if type(impl) not in _BROKEN_RUNS:
        _BROKEN_RUNS[type(impl)] = sm.run(impl, examples=40, steps=12, cases=[("lora", 4)], out=str(tmp_path),
                                          shrink_s=5)
    return _BROKEN_RUNS[type(impl)]


@pytest.mark.parametrize(("impl", "clauses"), [
    (UnmergeForgetsRequantize(), {sm.MERGE, sm.UNMERGE, sm.DRIFT}),
    (MergeForgetsFlags(), {sm.FLAGS}),
    (DeepcopyLosesAdapter(), {sm.ADAPTERS}),
    (SilentUnknownAdapter(), {sm.INVALID}),
], ids=lambda v: type(v).__name__ if isinstance(v, _Broken) else "")
def test_broken_layer_caught(impl: _Broken, clauses: set[str], tmp_path: Any) -> None:
    res = _run_broken(impl, tmp_path)
    found = set(res.failures)
    assert found & clauses, f"expected one of {clauses}, got {sorted(found)}\n{res.summary()}"
    for fails in res.failures.values():
        for f in fails:
            assert f.reproducer and os.path.isfile(f.reproducer), f.reproducer
            cfg, steps = load_steps(f.reproducer)
            assert cfg == f.config and len(steps) == len(f.trace) - 1
            # the minimal sequence replays to the same violation (deterministic)
            v = sm.replay(impl, cfg, steps)
            assert v is not None and v.clause == f.clause, (f.clause, v)
    cid = sorted(found & clauses)[0]
    shortest = min(len(f.trace) for f in res.failures[cid])
    assert shortest <= 4, f"{cid}: minimal sequence has {shortest} steps\n{res.summary()}"


def test_reproducer_script_runs_and_shows_divergence(tmp_path: Any) -> None:
    res = _run_broken(UnmergeForgetsRequantize(), tmp_path)
    f = next(iter(res.failures.values()))[0]
    # the script puts the checkout on sys.path itself (it must run from anywhere) ...
    root = str(Path(conformance.__file__).resolve().parents[1])
    assert f"sys.path.insert(0, {root!r})" in Path(f.reproducer).read_text(encoding="utf-8")
    # ... and the subprocess sees the checkout first whether it is pip-installed or used via
    # PYTHONPATH (the GPU box's nox session), run from an unrelated directory
    env = dict(os.environ, BITSANDBYTES_NOWELCOME="1")
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    proc = subprocess.run([sys.executable, f.reproducer], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIVERGENCE" in proc.stdout and f.clause in proc.stdout, proc.stdout


def test_clause_reports_reproducer(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the clause runner: the clause fails, names the sequence and records the reproducer path."""
    from conformance.spec.checks import stateful as checks

    monkeypatch.setenv(sm.ENV_EXAMPLES, "8")
    monkeypatch.setenv(sm.ENV_STEPS, "6")
    monkeypatch.setenv(sm.ENV_SHRINK_S, "4")
    monkeypatch.setenv(sm.ENV_REPORT_DIR, str(tmp_path))
    impl = MergeForgetsFlags()
    checks.clear_cache()
    # LoRA on 8-bit only (the harness derives methods and bit widths from the capabilities)
    impl.capabilities = frozenset(impl.capabilities) - {"oft", "4bit"}
    try:
        res = run_clause(registry()[sm.FLAGS], impl)
    finally:
        checks.clear_cache()
    assert res.outcome == "failed", res
    assert "minimal sequence" in res.message and "merge" in res.message
    path = res.measurements["reproducer"]
    assert path.startswith(str(tmp_path)) and os.path.isfile(path)


@pytest.mark.slow
def test_reference_long_run() -> None:
    """The long run (issue #8): 2000 sequences on the CPU, nothing found."""
    res = sm.run(ReferenceImplementation(), examples=500, steps=15)
    assert not res.failures and not res.errors, res.summary()


def test_layer_class_sanity() -> None:
    # the broken classes keep the reference behaviour they do not override
    impl = MergeForgetsFlags()
    from conformance.quant.layers import make_base_layer

    layer = impl.create(make_base_layer(64, 40, bits=8), AdapterSpec("lora", "a0", {"r": 4}))
    assert isinstance(layer, layer_class("lora", 8))


def test_device_move_only_in_cuda_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU-device run on a GPU host never draws device_move (it would touch CUDA)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    impl = ReferenceImplementation()
    stats = sm.Stats()
    machine = sm.make_machine(impl, sm.configs_for("lora", 8), "cpu", stats)
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(machine, settings=settings(max_examples=3, stateful_step_count=8, derandomize=True,
                                                         deadline=None, database=None,
                                                         suppress_health_check=list(HealthCheck)))
    assert stats.steps > 0 and "device_move" not in stats.ops


def test_device_move_reports_tensors_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A move that leaves bitsandbytes state on the old device is a STATE-VALID-NEVER-RAISES violation
    naming device_move, raised before any kernel could run on it."""
    import torch

    d = sm.Driver(ReferenceImplementation(), sm.MachineConfig("lora", 8, 32, 24))
    d.forward([2], "float32", "no_grad", 1)  # Linear8bitLt moves CB/SCB into its MatmulLtState
    assert ql.tensors_off_device(d.layer, "cpu") == []
    assert any("state.CB" in s for s in ql.tensors_off_device(d.layer, "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(type(d.layer), "to", lambda self, *a, **k: self)  # a move that moves nothing
    with pytest.raises(sm.Violation) as exc:
        d.device_move("cuda")
    assert exc.value.clause == sm.VALID and "device_move" in exc.value.message and "state.CB" in exc.value.message


def test_cpu_seeding_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from conformance import tinymodels

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    sm.seed_for("cpu", 3)
    with tinymodels.cpu_rng():
        torch.manual_seed(4)
    assert calls == []
    torch.manual_seed(5)
    assert calls == [5]


def test_a_library_warning_is_not_the_implementation_warning() -> None:
    """A warning issued inside bitsandbytes or torch must not let an implementation that silently
    accepts an invalid step pass STATE-INVALID-STEP-SAFE."""
    import warnings

    import bitsandbytes as bnb
    import torch

    from conformance.spec.observe import implementation_warnings, recorded_warnings

    with recorded_warnings() as caught:
        warnings.warn_explicit("from bitsandbytes", UserWarning, filename=bnb.functional.__file__, lineno=1)
        warnings.warn_explicit("from torch", UserWarning, filename=torch.nn.modules.module.__file__, lineno=1)
        warnings.warn("the implementation's own warning", UserWarning, stacklevel=1)
    assert len(caught) == 3
    assert implementation_warnings(caught) == ["the implementation's own warning"]


def test_replay_refuses_a_step_the_machine_could_not_have_drawn() -> None:
    """The minimizer deletes steps; a merge naming an adapter whose add_adapter it deleted is an
    invalid step, and must not be replayed as a valid one (it once shrank a PEFT finding that way)."""
    d = sm.Driver(ReferenceImplementation(), sm.MachineConfig("lora", 8, 32, 24))
    with pytest.raises(sm.StepNotApplicable):
        sm.apply_step(d, {"op": "merge", "adapter_names": ["a0", "a1"], "safe_merge": True})
    with pytest.raises(sm.StepNotApplicable):
        sm.apply_step(d, {"op": "unmerge"})
    sm.apply_step(d, {"op": "merge", "adapter_names": ["a0"], "safe_merge": True})
    assert d.layer.merged_adapters == ["a0"]
    with pytest.raises(sm.StepNotApplicable):
        sm.apply_step(d, {"op": "mixed_forward", "adapter_names": ["a0", "__base__"], "dtype": "float32", "seed": 0})
