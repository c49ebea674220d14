"""Area ``compile`` (COMPILE-FORWARD, COMPILE-MERGE-CYCLE) and what it stands on: telling a call that ran a
compiled graph from one dynamo ran eagerly (``conformance.clauses.compile.counting``), the backend per device."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from conformance.clauses import cases
from conformance.clauses.attribution import CaseSkipped
from conformance.clauses.broken import twins
from conformance.clauses.clause import get
from conformance.clauses.compile.cases import BACKENDS, backend_for
from conformance.clauses.compile.counting import CountingBackend, graph_breaks
from conformance.clauses.context import CheckContext
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.testing import broken_twin_tests

AREAS = {"compile"}
BROKEN = twins(AREAS)

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_counts_every_run_of_a_cached_graph() -> None:
    counter = CountingBackend("aot_eager")
    fn = torch.compile(_affine, backend=counter)
    x = torch.randn(4)
    for k in range(1, 4):
        assert torch.equal(fn(x), _affine(x))
        assert (counter.graphs, counter.runs) == (1, k)  # compiled once, run on every call
    assert counter.ops == 2


def test_a_call_into_a_disabled_function_runs_no_graph() -> None:
    """What the ``forward-compiler-disabled`` twin does: the compiled frame only calls a disabled function."""
    eager = torch.compiler.disable(_affine)

    def outer(x: torch.Tensor) -> torch.Tensor:
        return eager(x)

    counter = CountingBackend("aot_eager")
    x = torch.randn(4)
    assert torch.equal(torch.compile(outer, backend=counter)(x), _affine(x))
    assert (counter.graphs, counter.runs) == (0, 0)


def _scaled(x: torch.Tensor, n: int) -> torch.Tensor:
    return x * n


def _scaled_too(x: torch.Tensor, n: int) -> torch.Tensor:  # its own code object: dynamo caches per code object
    return x * n


def test_past_the_recompile_limit_a_call_runs_eagerly_and_only_runs_tell() -> None:
    """Past ``recompile_limit`` dynamo runs the frame eagerly: no graph runs. A compile counter cannot tell that
    call from one that reused a cached graph (neither compiles anything); the run count can."""
    counter = CountingBackend("aot_eager")
    frames = CompileCounterWithBackend("aot_eager")
    fn, fn2 = torch.compile(_scaled, backend=counter), torch.compile(_scaled_too, backend=frames)
    x = torch.randn(4)
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False, assume_static_by_default=True):
        assert torch.equal(fn(x, 2), x * 2) and torch.equal(fn2(x, 2), x * 2)
        assert (counter.graphs, counter.runs, frames.frame_count) == (1, 1, 1)
        assert torch.equal(fn(x, 2), x * 2) and torch.equal(fn2(x, 2), x * 2)  # cached graph, guards pass
        assert (counter.graphs, counter.runs, frames.frame_count) == (1, 2, 1)
        assert torch.equal(fn(x, 3), x * 3) and torch.equal(fn2(x, 3), x * 3)  # a recompile is due: limit hit
        assert (counter.graphs, counter.runs, frames.frame_count) == (1, 2, 1)  # eager: the count stands still


def test_graph_breaks_are_counted() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2

    counter = CountingBackend("aot_eager")
    x = torch.randn(4)
    assert torch.equal(torch.compile(broken, backend=counter)(x), (x + 1) * 2)
    assert graph_breaks() >= 1
    assert (counter.graphs, counter.runs) == (2, 2)  # the pieces on both sides still run compiled


def test_backend_per_device() -> None:
    assert backend_for("cpu") == "aot_eager" == BACKENDS["cpu"]
    assert backend_for(torch.device("cuda", 0)) == "inductor"
    with pytest.raises(ValueError, match="no torch.compile backend chosen for device 'meta'.*BACKENDS"):
        backend_for("meta")


class _NoInputCast(ReferenceImplementation):
    """LitGPT's situation: no input cast declared, so inputs of another dtype than the adapters' are left out."""

    name = "no-input-cast"
    methods = frozenset({"lora"})
    capabilities = ReferenceImplementation.capabilities - {"input_cast"}


def test_the_input_gate_is_applied_before_the_compiled_call() -> None:
    """The gate's pre-hook is traced by dynamo, which turns the skip it raises into an error of its own (torch
    2.11); ``admit_input`` raises the skip in eager code first."""
    ctx = CheckContext(_NoInputCast(), get("COMPILE-FORWARD"))
    layer = ctx.make_layer(cases.BaseCase(8, compute_dtype=torch.bfloat16).build(), "lora",
                           **cases.adapter_cases("lora")[0].params)
    ctx.admit_input(layer, torch.zeros(2, 64))  # float32: the adapters' dtype
    with pytest.raises(CaseSkipped, match="does not declare input_cast: a torch.bfloat16 input"):
        ctx.admit_input(layer, torch.zeros(2, 64, dtype=torch.bfloat16))
    res = run_clause(get("COMPILE-FORWARD"), _NoInputCast())
    assert res.outcome == "passed", res.message
    assert res.families["lora/8bit"].skip_reasons == {"input_cast not declared": res.families["lora/8bit"].skipped}


def test_a_twin_shown_on_one_family_names_a_family_of_its_clause() -> None:
    """test_fails_on_broken runs COMPILE-MERGE-CYCLE's twin on the family its bug shows on (``Broken.shows_on``)."""
    from conformance.testing import on_family

    family = BROKEN["COMPILE-MERGE-CYCLE"].shows_on
    clause = on_family("COMPILE-MERGE-CYCLE", family)
    assert (clause.methods, clause.bits) == ({family.split("/")[0]}, {int(family.split("/")[1][:-3])})
    for bad, words in (("lora", "METHOD/<bits>bit"), ("lora/2bit", "no case family"), ("shira/4bit", "no case family")):
        with pytest.raises(ValueError, match=words):
            on_family("COMPILE-MERGE-CYCLE", bad)
