"""One ``Outcome`` (``conformance.core.outcome``): the report summary, the exit status, ``compare``, ``join``,
the xfail rule and the pytest adapter agree on what fails a run; a run that checked nothing exits 3; the
fingerprint names the CPU features and bitsandbytes' CPU paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conformance.core import join
from conformance.core.outcome import (
    EXIT_FAIL,
    EXIT_NOTHING_CHECKED,
    EXIT_OK,
    MUST,
    OUTCOMES,
    SEVERITY,
    SHOULD,
    Outcome,
)
from conformance.core.outcome import exit_status as core_exit_status
from conformance.harness import report
from conformance.harness import xfails as xf
from conformance.harness.results import Result, exit_status, nothing_checked

ROOT = Path(__file__).resolve().parents[1]


def test_outcome_values_are_the_report_strings() -> None:
    assert [o.value for o in OUTCOMES] == ["passed", "failed", "error", "inconclusive", "skipped", "xfailed",
                                           "xpassed"]
    assert Outcome("inconclusive") is Outcome.INCONCLUSIVE and Outcome.FAILED == "failed"
    assert json.dumps({"o": Outcome.XPASSED}) == '{"o": "xpassed"}'
    assert f"{Outcome.ERROR}|{Outcome.ERROR:>7}" == "error|  error" and str(Outcome.PASSED) == "passed"
    assert {"passed": 1}[Outcome.PASSED] == 1  # keys of JSON-read summaries
    assert set(SEVERITY) == set(OUTCOMES)
    with pytest.raises(ValueError):
        Result("X", "i", "fine")  # an outcome that does not exist is refused where the result is made


@pytest.mark.parametrize("outcome,failure,must_exit,should_exit,xfail,xfail_error", [
    ("passed", False, False, False, False, False),
    ("failed", True, True, False, True, True),
    ("error", True, True, False, False, True),
    ("inconclusive", True, True, False, True, True),
    ("skipped", False, False, False, False, False),
    ("xfailed", False, False, False, False, False),
    ("xpassed", False, True, True, False, False),
])
def test_predicates(outcome: str, failure: bool, must_exit: bool, should_exit: bool, xfail: bool,
                    xfail_error: bool) -> None:
    o = Outcome(outcome)
    assert o.is_failure is failure
    assert o.is_finding is (failure or o is Outcome.XPASSED)
    assert o.counts_for_exit(MUST) is must_exit and o.counts_for_exit(SHOULD) is should_exit
    assert o.covered_by_xfail() is xfail and o.covered_by_xfail(covers_error=True) is xfail_error
    entry = xf.parse(f"X-Y impl {'[error] ' if xfail_error and not xfail else ''}known\n")[0]
    assert entry.covers(outcome) is (xfail or (xfail_error and not xfail))


def test_worst_of_families() -> None:
    assert Outcome.worst(["passed", "skipped", "inconclusive"]) is Outcome.INCONCLUSIVE
    assert Outcome.worst(["error", "failed", "passed"]) is Outcome.FAILED
    assert Outcome.worst(["skipped", "passed"]) is Outcome.PASSED
    assert Outcome.worst(["skipped"]) is Outcome.SKIPPED
    with pytest.raises(ValueError):
        Outcome.worst([])


# -- one report, four readers -------------------------------------------------------------------------------

def _doc(results: list[Result]) -> dict:
    clauses = {r.clause: {"level": r.level, "text": "t", "source": "s", "area": "a"} for r in results}
    return {"schema_version": report.SCHEMA_VERSION, "environment": {}, "command": "",
            "implementations": {n: {"version": "1"} for n in dict.fromkeys(r.implementation for r in results)},
            "clauses": clauses, "results": [r.to_json() for r in results], "summary": report.summarize(results)}


def test_summary_exit_status_compare_and_join_agree_on_an_inconclusive_must() -> None:
    """One report: an inconclusive MUST clause among passes (and a SHOULD failure, which fails nothing)."""
    new = [Result("STATE-OUTPUT-MATCHES-MODEL", "x", "inconclusive", "ran below its floor of steps"),
           Result("MERGE-ROUNDTRIP", "x", "passed"), Result("MERGE-WARNS-LORA-TEXT", "x", "failed", level=SHOULD),
           Result("FWD-ORACLE", "x", "xfailed", "known [xfail: upstream]")]
    old = [Result(r.clause, r.implementation, "passed", level=r.level) for r in new]
    doc, before = _doc(new), _doc(old)
    musts = [r for r in doc["results"] if Outcome(r["outcome"]).counts_for_exit(r["level"])]
    assert len(musts) == 1  # the inconclusive MUST; the SHOULD failure and the xfailed one do not count

    # the summary
    assert doc["summary"]["implementations"]["x"]["must_failures"] == 1
    assert doc["summary"]["implementations"]["x"]["inconclusive"] == 1
    # the exit status (the one the CLI returns: cli._finish returns doc["summary"]["exit_status"])
    assert doc["summary"]["exit_status"] == exit_status(new) == EXIT_FAIL
    assert before["summary"]["exit_status"] == EXIT_OK
    # compare: passed -> inconclusive of a MUST clause is a new failure; the SHOULD one is not
    text, status = report.compare(before, doc)
    assert status == 1 and "New failures: 1" in text, text
    assert "STATE-OUTPUT-MATCHES-MODEL [x]: passed -> inconclusive" in text.split("Fixed:")[0]
    assert "MERGE-WARNS-LORA-TEXT [x]: passed -> failed" in text.split("Other outcome changes:")[1]
    assert report.compare(doc, before)[1] == 0 and "Fixed: 1" in report.compare(doc, before)[0]
    # join: the same MUST failure count, the inconclusive among the findings
    joined = join.join([("new.json", doc)])
    col = joined["columns"][0]["id"]
    assert joined["summary"][col]["must_failures"] == doc["summary"]["implementations"]["x"]["must_failures"]
    assert ("STATE-OUTPUT-MATCHES-MODEL", col, "inconclusive") in [f[:3] for f in join.findings(joined)]
    # the Markdown lists it among the failures, and the terminal table's MUST-fail column says 1
    assert "### `STATE-OUTPUT-MATCHES-MODEL` · x · inconclusive (MUST)" in report.markdown(doc)
    assert report.terminal_table(doc).splitlines()[2].split()[-1] == "1"


def test_matrix_report_counts_inconclusive_as_a_failure(tmp_path: Path) -> None:
    from conformance.ci import matrix_report

    results = [Result("STATE-OUTPUT-MATCHES-MODEL", "x", "inconclusive", "too few steps"),
               Result("MERGE-ROUNDTRIP", "x", "passed")]
    cell = tmp_path / "cell-a"
    cell.mkdir()
    (cell / "conformance.json").write_text(json.dumps(_doc(results)))
    doc = matrix_report.join(tmp_path)
    assert doc["cells"]["cell-a"]["messages"] == {"x STATE-OUTPUT-MATCHES-MODEL": "too few steps"}
    assert "1 pass / 1 fail (1 MUST) / 0 skip" in matrix_report.markdown(doc)


def test_exit_status_rule() -> None:
    assert core_exit_status([]) == EXIT_OK
    assert core_exit_status([("a", "passed", MUST), ("b", "skipped", MUST)]) == EXIT_NOTHING_CHECKED
    assert core_exit_status([("a", "failed", MUST), ("b", "skipped", MUST)]) == EXIT_FAIL  # a failure wins
    assert core_exit_status([("a", "xfailed", MUST), ("a", "skipped", MUST)]) == EXIT_OK  # an xfail ran
    assert core_exit_status([("a", "failed", SHOULD)]) == EXIT_OK
    assert core_exit_status([("a", "xpassed", SHOULD)]) == EXIT_FAIL


# -- nothing passes that did not run ------------------------------------------------------------------------

def test_nothing_checked_names_the_capabilities_to_declare() -> None:
    results = [Result("SAFE-MERGE-NONFINITE", "m", "skipped", "m does not declare capability safe_merge"),
               Result("DIST-DDP-GRADS-AGREE", "m", "skipped", "m does not declare capability distributed"),
               Result("FWD-ORACLE", "ref", "passed")]
    why = nothing_checked(results)
    assert set(why) == {"m"}
    assert why["m"].startswith("nothing checked for m: all 2 clauses were skipped;")
    assert "declare capability safe_merge, distributed" in why["m"]
    doc = _doc(results)
    assert doc["summary"]["exit_status"] == EXIT_NOTHING_CHECKED and doc["summary"]["nothing_checked"] == why
    assert f"**Nothing checked**: {why['m']}" in report.markdown(doc)


@pytest.fixture
def merge_only(monkeypatch: pytest.MonkeyPatch) -> str:
    """The merge-only example (declares no safe merge, no Trainer, no DDP), importable here and in workers."""
    path = str(ROOT / "examples" / "merge_only")
    monkeypatch.syspath_prepend(path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([path, str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return "merge_only_lora.impl:impl"


NOTHING_APPLIES = ["--clauses", "SAFE-MERGE-*", "--clauses", "TRAINER-*", "--clauses", "DIST-*"]


@pytest.mark.e2e
def test_a_run_that_checked_nothing_exits_3_and_says_why(merge_only: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI's run path (workers and all): every chosen clause needs a capability the implementation
    does not declare, so nothing ran: exit 3, one line naming what to declare, never "OK"."""
    from conformance import cli

    out = tmp_path / "r.json"
    status = cli.main(["run", "--impl", merge_only, *NOTHING_APPLIES, "--report", str(out)])
    printed = capsys.readouterr().out
    assert status == EXIT_NOTHING_CHECKED == 3, printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("nothing checked for merge_only"))
    assert "declare capability" in line and "safe_merge" in line and "model" in line, line
    assert "result: NOTHING CHECKED" in printed and "result: OK" not in printed
    doc = json.loads(out.read_text())
    assert doc["summary"]["exit_status"] == 3 and set(doc["summary"]["nothing_checked"]) == {"merge_only"}
    assert all(r["outcome"] == "skipped" for r in doc["results"]) and doc["results"]


def test_check_implementation_raises_when_nothing_ran(merge_only: str) -> None:
    from merge_only_lora.impl import impl

    from conformance.clauses.clause import select
    from conformance.testing import ConformanceFailure, NothingChecked, check_implementation, iter_checks

    with pytest.raises(NothingChecked, match="nothing checked for merge_only: .*safe_merge") as info:
        check_implementation(impl, clauses=["SAFE-MERGE-*", "DIST-*"])
    chosen = select(["SAFE-MERGE-*", "DIST-*"], bound=False)  # every chosen clause has its (skipped) result
    assert isinstance(info.value, ConformanceFailure) and len(info.value.results) == len(chosen)
    with pytest.warns(UserWarning, match="nothing checked for merge_only"):
        check_implementation(impl, clauses=["SAFE-MERGE-*"], on_fail="warn")
    assert len(check_implementation(impl, clauses=["SAFE-MERGE-*"], on_fail=None)) == 4
    # under pytest (parametrize_with_checks): every test is skipped with its reason, naming the capability
    for _, check, _, _ in iter_checks([impl], clauses=["SAFE-MERGE-*"]):
        with pytest.raises(pytest.skip.Exception, match="does not declare capability .*safe_merge"):
            check()


# -- the environment that explains a result -----------------------------------------------------------------

def test_cpu_flags_parse() -> None:
    from conformance.quant.dispatch import CPU_FLAGS, cpu_flags

    got = cpu_flags("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert got == {f: f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") for f in CPU_FLAGS}
    assert cpu_flags("no flags line here\n") is None


def test_fingerprint_names_cpu_features_and_the_bnb_cpu_kernel() -> None:
    import bitsandbytes.functional as F  # noqa: N812
    import torch

    from conformance.harness.environment import fingerprint
    from conformance.quant.dispatch import cpu_flags, describe

    env = fingerprint("cpu")
    d = env["cpu_dispatch"]
    assert d["flags"] == cpu_flags() and {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} <= set(d["flags"])
    assert d["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    b = d["bitsandbytes"]
    assert b["avx512_bf16"] == bool(F.has_avx512bf16()) == b["linear4bit_eval_repack"]
    kernel = b["cpu_kernel"]
    assert isinstance(kernel["loaded"], bool)
    if not kernel["loaded"]:
        assert kernel["reason"]  # why not: never a bare "no"
    if not b["avx512_bf16"]:
        assert not kernel["loaded"] and "AVX512-BF16" in kernel["reason"]
    json.dumps(env)  # it goes into the JSON report
    line = describe(d)
    assert f"torch CPU capability {d['torch_cpu_capability']}" in line and "avx512_bf16" in line
    assert "gemm_4bit_forward" in line and "AVX512-BF16" in line


def test_the_kernel_reason_is_bitsandbytes_own_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an AVX512-BF16 CPU offline, bitsandbytes 0.50.2 tried the kernel and logged why it failed: kept."""
    import bitsandbytes.backends.cpu.ops as ops
    import bitsandbytes.functional as F  # noqa: N812

    import conformance
    from conformance.quant import dispatch

    msg = ("Failed to load CPU gemm_4bit_forward from kernels-community: We couldn't connect to "
           "'https://huggingface.co'. Please make sure you already `pip install kernels`")
    monkeypatch.setattr(F, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(ops, "gemm_4bit_forward_kernel", None, raising=False)
    monkeypatch.setattr(conformance.BNB_CPU_LOG, "messages", [msg])
    k = dispatch.bnb_cpu_backend()
    assert k["avx512_bf16"] and k["linear4bit_eval_repack"]
    assert k["cpu_kernel"] == {"name": dispatch.BNB_CPU_KERNEL, "loaded": False, "reason": msg}
    monkeypatch.setattr(conformance.BNB_CPU_LOG, "messages", [])  # imported before conformance: what we can tell
    import importlib.util

    # where the optional `kernels` package is missing (the H200 image) the reason says so instead
    expected = ("kernels-community/quantization-bitsandbytes" if importlib.util.find_spec("kernels")
                else "the `kernels` package is not installed")
    assert expected in dispatch.bnb_cpu_backend()["cpu_kernel"]["reason"]
    monkeypatch.setattr(ops, "gemm_4bit_forward_kernel", object())
    assert dispatch.bnb_cpu_backend()["cpu_kernel"]["loaded"] is True


def test_the_bnb_cpu_warning_is_kept_not_shown() -> None:
    import logging

    import conformance

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    n = len(conformance.BNB_CPU_LOG.messages)
    assert not conformance.BNB_CPU_LOG.filter(log.makeRecord(log.name, logging.WARNING, __file__, 1,
                                                             "Failed to load CPU %s", ("gemm_4bit_forward",), None))
    assert conformance.BNB_CPU_LOG.messages[n:] == ["Failed to load CPU gemm_4bit_forward"]
    del conformance.BNB_CPU_LOG.messages[n:]

