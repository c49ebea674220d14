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


def test_banner_compares_with_every_stored_baseline_of_the_device(tmp_path: Path) -> None:
    """The per-case baseline first, then one line for each other stored baseline (not the same one twice)."""
    from conformance.ci.baselines import device_baselines

    store = tmp_path / "store"
    store.mkdir()
    for name, torch, dev, req in (("b.json", "2.15.0", "cpu", {"a": False, "b": False}),
                                  ("a.json", "2.13.0+cpu", "cpu", {"a": True, "b": False}),
                                  ("g.json", "2.11.0", "cuda", {"a": True, "b": True})):
        doc = {"environment": {"device": dev, "packages": {"torch": torch, "bitsandbytes": "0.50.2"}},
               "verdict": {"torch": torch, "bitsandbytes": "0.50.2", "line": "x"},
               "cases": [{"id": k, "clone_required": v} for k, v in req.items()]}
        (store / name).write_text(json.dumps(doc))
    (store / "junk.json").write_text("{")
    stored = device_baselines(store, "cpu")
    assert [p.name for p in stored] == ["a.json", "b.json"], "cpu only, ordered by torch"
    new = _probe(tmp_path / "new.json", "2.14.1", {"a": True, "b": False})
    # the per-case baseline of a run: the newest torch not newer than the one that runs, else the newest
    from conformance.ci.baselines import previous_baseline

    assert previous_baseline(store, "cpu", "2.14.1+cu130").name == "a.json"
    assert previous_baseline(store, "cpu", "2.16.0").name == "b.json"
    assert previous_baseline(store, "cpu", "2.15.0").name == "b.json"
    assert previous_baseline(store, "cpu", "2.1.0").name == "b.json", "none older: the newest"
    assert previous_baseline(store, "cuda", "2.14.1").name == "g.json"
    (store / "sub").mkdir()
    lines = verdict_line(new, "cpu", store / "sub" / ".." / "b.json", stored).splitlines()  # b.json spelt otherwise
    assert len(lines) == 3 and lines[0].startswith("VERDICT torch 2.14.1")
    assert lines[1].startswith("vs baseline torch 2.15.0") and "clone required for 0 -> 1 cases" in lines[1]
    assert lines[2].startswith("vs baseline torch 2.13.0+cpu") and "0 no longer need it, 0 newly need it" in lines[2]


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
