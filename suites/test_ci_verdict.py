"""The regress verdict banner carries the comparison with the stored baseline (it used to scroll away above it)."""

from __future__ import annotations

import json
from pathlib import Path

from conformance.ci.postprocess import verdict_line


def _probe(path: Path, torch: str, required: dict[str, bool]) -> Path:
    path.write_text(json.dumps({"verdict": {"torch": torch, "bitsandbytes": "0.50.2", "line": f"{torch} line"},
                                "cases": [{"id": k, "clone_required": v} for k, v in required.items()]}))
    return path


def test_banner_names_the_baseline_and_the_cases_that_changed(tmp_path: Path) -> None:
    old = _probe(tmp_path / "old.json", "2.13.0", {"a": True, "b": True, "c": False})
    new = _probe(tmp_path / "new.json", "2.15.0", {"a": False, "b": True, "c": True})
    text = verdict_line(new, "cpu", old)
    assert text.startswith("VERDICT torch 2.15.0 / bitsandbytes 0.50.2 on cpu: 2.15.0 line")
    assert "vs baseline torch 2.13.0" in text and "clone required for 2 -> 2 cases" in text
    assert "1 no longer need it, 1 newly need it (3 cases compared)" in text


def test_banner_without_a_baseline_says_so(tmp_path: Path) -> None:
    new = _probe(tmp_path / "new.json", "2.15.0", {"a": False})
    assert verdict_line(new, "cpu", None).endswith("baseline: none stored for this device")
    assert verdict_line(tmp_path / "missing.json", "cpu", None) is None


def test_cli_xfail_relaxed_keeps_a_listed_pass_passed(capsys) -> None:  # noqa: ANN001
    """Through the CLI's own end of a run: strict by default (a listed pass is xpassed, exit 1), relaxed with
    --xfail-relaxed (it stays passed, exit 0)."""
    from conformance import cli
    from conformance.clauses.clause import catalog
    from conformance.harness import xfails as xf
    from conformance.harness.results import Result
    from conformance.harness.runner import ImplInfo

    chosen = [catalog()["MERGE-ROUNDTRIP"]]
    entries = xf.parse("MERGE-ROUNDTRIP peft known upstream bug\n")
    got = {}
    for flags in ([], ["--xfail-relaxed"]):
        args = cli.build_parser().parse_args(["run", "--impl", "peft", *flags])
        results = [Result(clause="MERGE-ROUNDTRIP", implementation="peft", outcome="passed")]
        status = cli._finish(args, chosen, ["peft"], [ImplInfo(name="peft")], results, entries, False)
        got[bool(flags)] = (status, results[0].outcome)
    capsys.readouterr()
    assert got == {False: (1, "xpassed"), True: (0, "passed")}, got
