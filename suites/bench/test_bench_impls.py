"""The benchmarks find implementations through the runner's loader, and time ``NAME@PYTHON`` in that interpreter.

Default tier: an implementation named ``package.module:attr`` (or an entry point, or a built-in) is built through
its ``create`` and timed in this process; a library wrapper is unwrapped; merge rounds need ``unmerge``; bad
``--impl`` values and interpreters are one-line usage errors found before anything is timed. ``e2e``: a case of
``reference@<this interpreter>`` is timed in a child interpreter and comes back as a record of its own.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from conformance.bench import __main__ as bench_main
from conformance.bench import runner
from conformance.bench.cases import BenchCase, matrix
from conformance.bench.layers import Builder
from conformance.clauses.interface import ImplementationUnsupported
from conformance.harness.runner import UsageError
from conformance.impls.library import LibraryLayer
from conformance.impls.reference import ReferenceImplementation
from conformance.reference import LoraLinear4bit

QUICK = matrix("cpu", quick=True)
FWD = next(c for c in QUICK if (c.impl, c.method, c.bits, c.op) == ("reference", "lora", 4, "fwd"))
MERGE = next(c for c in QUICK if (c.impl, c.method, c.op) == ("reference", "lora", "merge"))
BY_PATH = "conformance.impls.reference:ReferenceImplementation"


class NoUnmerge(ReferenceImplementation):
    """The reference declaring no unmerge (as a merge-only library would)."""

    name = "no-unmerge"
    capabilities = ReferenceImplementation.capabilities - {"unmerge"}


def test_module_attr_implementation_is_built_through_create_and_timed() -> None:
    """``package.module:attr`` is the reference loaded by path: the same layer as the ``reference`` row (same
    seeds, so the same output bit for bit), timed in this process."""
    warnings.simplefilter("ignore")
    builder = Builder("cpu")
    case = FWD.with_impl(BY_PATH)
    out = builder.prepare(case).fn()
    assert type(builder.layer(case)) is LoraLinear4bit
    assert torch.equal(out, builder.prepare(FWD).fn())
    fwdbwd = next(c for c in QUICK if c.group == FWD.group.replace("/fwd/", "/fwdbwd/") and c.impl == "reference")
    recs = runner.time_cases(builder, [case, fwdbwd.with_impl(BY_PATH)], "cpu", quick=True, log=lambda _: None)
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    assert recs[0]["key"].endswith("/" + BY_PATH) and recs[0]["timing"]["rounds"] > 0


def test_library_wrapper_is_unwrapped() -> None:
    """PEFT found by the loader: its own layer is timed, not the protocol wrapper."""
    pytest.importorskip("peft")
    warnings.simplefilter("ignore")
    builder = Builder("cpu")
    layer = builder.layer(FWD.with_impl("peft"))
    assert type(layer).__module__.startswith("peft."), type(layer)


class NoOft(ReferenceImplementation):
    """The reference without OFT: ``create`` refuses it, as a LoRA-only library's does."""

    name = "no-oft"
    methods = ReferenceImplementation.methods - {"oft"}

    def create(self, base_layer, spec):  # noqa: ANN001, ANN201
        if spec.method == "oft":
            raise ImplementationUnsupported("no-oft: has no OFT")
        return super().create(base_layer, spec)


def test_merge_rounds_need_unmerge() -> None:
    case = MERGE.with_impl(f"{__name__}:NoUnmerge")
    with pytest.raises(ImplementationUnsupported, match="declares no unmerge"):
        Builder("cpu").prepare(case)


def test_what_an_implementation_lacks_is_skipped_not_an_error() -> None:
    oft = next(c for c in QUICK if (c.impl, c.method, c.op) == ("reference", "oft", "fwd"))
    cases = [MERGE.with_impl(f"{__name__}:NoUnmerge"), oft.with_impl(f"{__name__}:NoOft")]
    recs = runner.time_cases(Builder("cpu"), cases, "cpu", quick=True, log=lambda _: None)
    assert [r["status"] for r in recs] == ["skipped", "skipped"], recs
    assert "declares no unmerge" in recs[0]["error"] and "has no OFT" in recs[1]["error"]


def test_a_library_merge_round_calls_the_protocol_merge() -> None:
    """Forwards time the library's own layer; a merge round calls the wrapper's ``merge``/``unmerge`` (the library's
    own layer may name them otherwise: adapters' ``merge_adapter``/``reset_adapter``)."""
    pytest.importorskip("peft")
    warnings.simplefilter("ignore")
    prep = Builder("cpu").prepare(MERGE.with_impl("peft"))
    layer = prep.fn.__self__
    assert isinstance(layer, LibraryLayer), type(layer)
    prep.setup()
    prep.fn()
    assert layer.merged


def test_bad_impl_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main.main(["--impl", "no_such_impl", "--quick", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --impl no_such_impl: unknown implementation 'no_such_impl'"), err
    assert bench_main.main(["--impl", "reference@", "--quick", "--device", "cpu"]) == 2
    assert "NAME@PYTHON" in capsys.readouterr().err


def test_missing_interpreter_is_refused_before_timing(tmp_path) -> None:
    missing = str(tmp_path / "no-python")
    with pytest.raises(UsageError, match="does not exist"):
        runner.run([FWD.with_impl(f"reference@{missing}")], "cpu", quick=True, log=lambda _: None)


def test_with_impls_adds_a_row_beside_each_reference_row() -> None:
    got = bench_main.with_impls(QUICK, ["x:y", "reference"])
    added = [c for c in got if c.impl == "x:y"]
    assert len(added) == sum(c.impl == "reference" for c in QUICK) and len(got) == len(QUICK) + len(added)
    assert got[got.index(FWD) + 1] == FWD.with_impl("x:y")


@pytest.mark.e2e
def test_name_at_python_is_timed_in_that_interpreter() -> None:
    """``reference@<python>``: the child interpreter times the case with ``reference`` loaded there; the record
    keeps the case's own implementation string and names the interpreter; its packages and fingerprint are kept."""
    spec = f"reference@{sys.executable}"
    case: BenchCase = FWD.with_impl(spec)
    logged: list[str] = []
    doc = runner.run([case], "cpu", quick=True, log=logged.append, mem_shapes=[(256, 256)])
    (rec,) = doc["results"]
    assert rec["status"] == "ok", rec
    assert rec["impl"] == spec and rec["key"] == case.key and rec["python"] == sys.executable
    assert rec["timing"]["rounds"] > 0 and rec["tokens_per_s"] > 0
    there = doc["elsewhere"][sys.executable]
    assert there["packages"]["torch"] == torch.__version__ and there["environment"]["device"] == "cpu"
    assert any(sys.executable in line for line in logged), logged
