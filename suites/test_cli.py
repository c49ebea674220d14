"""The command line answers fast: listing, comparing, rendering, help and usage errors import no torch.

Also the Markdown report a maintainer reads (legend, durations, measurement table, messages cut at
word boundaries, reproducer links) and ``compare`` reading schema 1 reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.harness import report

# tooling, not device code: CPU CI runs it; the gpu session leaves it out
pytestmark = pytest.mark.cpu_only

HEAVY = ("torch", "bitsandbytes", "transformers", "peft")

# runs the CLI in-process exactly as `python -m conformance ARGS`, then says which heavy modules it imported
_PROBE = f"""
import json, runpy, sys
args = json.loads(sys.argv[1])
sys.argv = ["conformance", *args]
code = 0
try:
    runpy.run_module("conformance", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
sys.stderr.write("\\nPROBE " + json.dumps({{"heavy": heavy, "code": code}}) + "\\n")
"""


def _probe(*args: str) -> tuple[dict, str, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][6:]), proc.stdout, proc.stderr


def _report(tmp_path: Path, name: str, outcome: str) -> Path:
    r = {"clause": "MERGE-ROUNDTRIP", "implementation": "x", "outcome": outcome, "message": "m", "duration_s": 0.2,
         "measurements": {"worst_ratio": 0.5}, "level": "MUST", "device": "cpu"}
    doc = {"schema_version": "1", "environment": {"python": "3.11"}, "implementations": {"x": {"version": "1"}},
           "clauses": {"MERGE-ROUNDTRIP": {"level": "MUST", "text": "t", "source": "s", "area": "merge"}},
           "results": [r], "summary": {"implementations": {"x": {"passed": 1}}, "exit_status": 0}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["clauses"], 0),
    (["clauses", "--json"], 0),
    (["compare", "OLD", "NEW"], 1),
    (["markdown", "OLD"], 0),
    (["run", "--no-such-option"], 2),
    (["nonsense"], 2),
    (["run", "--clauses", "NO-SUCH-*"], 2),
    (["run", "--report", "BLOCKED/r.json"], 2),
    (["run", "--examples", "0"], 2),
    (["compare", "MISSING", "MISSING"], 2),
    (["join", "OLD", "NEW"], 0),
    (["join", "OLD", "MISSING"], 2),
    (["join", "OLD", "--json", "BLOCKED/j.json"], 2),
    (["run", "--impl", "x@MISSING"], 2),
    (["run", "--impl", "x@"], 2),
    (["run", "--impl", "x", "--python", "y=MISSING"], 2),
    (["run", "--impl", "x@A", "--python", "x=B"], 2),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_answers_without_importing_torch(tmp_path: Path, args: list[str], code: int) -> None:
    subst = {"OLD": str(_report(tmp_path, "old.json", "passed")), "NEW": str(_report(tmp_path, "new.json", "failed")),
             "MISSING": str(tmp_path / "missing.json")}
    (tmp_path / "blocker").write_text("")
    args = [subst.get(a, a.replace("BLOCKED", str(tmp_path / "blocker"))) for a in args]
    got, stdout, stderr = _probe(*args)
    assert got == {"heavy": [], "code": code}, stdout + stderr
    assert "Traceback" not in stderr


_HELPS = f"""
import argparse, contextlib, io, json, sys
from conformance import cli

def commands(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))

got = []
for cmd in commands(cli.build_parser()):  # every subcommand, nested ones (probe clone) included
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = cli.main([*cmd, "--help"])
        except SystemExit as exc:
            code = exc.code
    heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
    got.append({{"cmd": " ".join(cmd), "code": code, "heavy": heavy, "help": out.getvalue()}})
print(json.dumps(got))
"""


@pytest.mark.e2e
def test_every_subcommand_answers_help_without_torch() -> None:
    """``--help`` of every subcommand (found in the parser, so a new one is covered) in one fresh interpreter:
    exit 0, its own usage line, and no heavy import after it."""
    proc = subprocess.run([sys.executable, "-c", _HELPS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {g["cmd"] for g in got} >= {"", "run", "clauses", "compare", "join", "markdown", "probe", "probe clone",
                                       "stateful"}, [g["cmd"] for g in got]
    for g in got:
        assert g["code"] == 0 and g["heavy"] == [], g
        assert f"usage: python -m conformance {g['cmd']}".rstrip() in g["help"], g


@pytest.mark.e2e
def test_bench_help_imports_no_torch() -> None:
    """``python -m conformance.bench --help`` answers before torch and bitsandbytes are imported."""
    code = ("import json, runpy, sys\nsys.argv = ['conformance.bench', '--help']\ntry:\n"
            "    runpy.run_module('conformance.bench', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            f"print(json.dumps([code, sorted(m for m in {list(HEAVY)!r} if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == [0, []], (got, proc.stderr[-2000:])
    assert "usage: python -m conformance.bench" in proc.stdout


@pytest.mark.e2e
def test_console_script_help_imports_no_torch() -> None:
    """The installed ``conformance`` script (pip install -e .) answers --help without torch."""
    script = shutil.which("conformance", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no `conformance` console script next to this interpreter (the package is not pip-installed)")
    proc = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "python -m conformance" in proc.stdout and "run" in proc.stdout
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.e2e
def test_clauses_wraps_to_the_terminal() -> None:
    proc = subprocess.run([sys.executable, "-m", "conformance", "clauses"], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "70"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) > 40 and max(len(ln) for ln in lines) <= 70, max(lines, key=len)
    assert "MERGE-ROUNDTRIP  MUST" in lines


def test_shorten_cuts_at_a_word_boundary() -> None:
    text = "lora 4-bit: merged forward outside the bound of one requantization"
    assert report.shorten(text, 200) == text
    cut = report.shorten(text, 30)
    assert len(cut) <= 30 and cut.endswith("…") and text.startswith(cut[:-1])
    assert text[len(cut) - 1] == " "  # the cut fell between words
    assert report.shorten("a\n  b   c", 10) == "a b c"


def _rich_doc(tmp_path: Path) -> dict:
    repro = tmp_path / "reproducers" / "repro_state_merge.py"
    res = [
        {"clause": "MERGE-ROUNDTRIP", "implementation": "x", "outcome": "failed", "message": "merged forward off",
         "duration_s": 1.234, "level": "MUST", "device": "cpu",
         "measurements": {"worst_ratio": 2.5, "families": {"lora/4bit": "failed: off", "oft/8bit": "passed"},
                          "reproducer": str(repro), "notes": ["n"]}},
        {"clause": "STATE-OUTPUT-MATCHES-MODEL", "implementation": "x", "outcome": "inconclusive",
         "message": "too few steps", "duration_s": 0.5, "level": "MUST", "device": "cpu", "measurements": {}},
    ]
    clauses = {r["clause"]: {"level": "MUST", "text": "t", "source": "s", "area": "a"} for r in res}
    return {"schema_version": "1", "environment": {}, "implementations": {"x": {"version": "1"}},
            "clauses": clauses | {"FWD-ORACLE": {"level": "MUST", "text": "t", "source": "s", "area": "a"}},
            "results": res,
            "summary": report.summarize([report.Result.from_json(r) for r in res]),
            "not_run": [{"clause": "FWD-ORACLE", "implementation": "x"}]}


def test_markdown_reads_at_a_glance(tmp_path: Path) -> None:
    text = report.markdown(_rich_doc(tmp_path), base=tmp_path)
    for mark, outcome in (("✅", "passed"), ("❔", "inconclusive"), ("⏹️", "not run")):  # the legend
        assert f"| {mark} | {outcome} | " in text
    assert "| `MERGE-ROUNDTRIP` | MUST | ❌ 1.2 s |" in text  # mark and duration
    assert "| `FWD-ORACLE` | MUST | ⏹️ |" in text
    # the summary counts inconclusive: the outcomes' header and x's row line up
    header = next(ln for ln in text.splitlines() if ln.startswith("| implementation |"))
    row = next(ln for ln in text.splitlines() if ln.startswith("| x |"))
    assert row.split("|")[header.split("|").index(" inconclusive ")].strip() == "1"
    # measurements: one row per key, nested dicts as dotted keys, not a JSON string
    assert "| `MERGE-ROUNDTRIP` | x | worst_ratio | 2.5 |" in text
    assert "| `MERGE-ROUNDTRIP` | x | families.lora/4bit | failed: off |" in text
    assert '{"' not in text
    # the failure links its reproducer, relative to the Markdown file's folder
    assert "Reproducer: [`repro_state_merge.py`](reproducers/repro_state_merge.py)" in text
    assert "### `STATE-OUTPUT-MATCHES-MODEL` · x · inconclusive" in text


def test_compare_reads_schema_1_reports_without_inconclusive(tmp_path: Path) -> None:
    old = report.load(_report(tmp_path, "old.json", "passed"))
    new = report.load(_report(tmp_path, "new.json", "error"))
    text, status = report.compare(old, new)
    assert status == 1 and "MERGE-ROUNDTRIP [x]: passed -> error" in text
    md = report.markdown(old)
    assert re.search(r"\| x \| 1 \| 1 \| 0 \| 0 \| 0 \|", md), md  # absent outcome counts read as 0


def test_cpu_ci_writes_the_report_markdown_to_the_step_summary() -> None:
    yaml = pytest.importorskip("yaml")
    root = Path(__file__).resolve().parent.parent
    steps = yaml.safe_load((root / ".github/workflows/cpu.yml").read_text())["jobs"]["report"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any("nox -s report" in r for r in runs)
    assert any("reports/reference.md" in r and '>> "$GITHUB_STEP_SUMMARY"' in r for r in runs), runs
    assert '"reference.md"' in (root / "conformance" / "ci" / "sessions.py").read_text()  # what `nox -s report` writes


@pytest.mark.e2e
def test_probe_clone_parses_its_own_options() -> None:
    """The clone probe parses its own options (before it imports torch): --help shows them, a typo is exit 2."""
    proc = subprocess.run([sys.executable, "-m", "conformance", "probe", "clone", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "--threads" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "conformance", "probe", "clone", "--bogus"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("unrecognized arguments: --bogus"), proc.stderr


def test_terminal_table_columns_line_up(tmp_path: Path) -> None:
    lines = report.terminal_table(_rich_doc(tmp_path)).splitlines()
    header = lines[0].split()
    assert header[: len(report.OUTCOMES) + 1] == ["implementation", *report.OUTCOMES]
    row = lines[2].split()
    assert row[0] == "x" and row[1 + report.OUTCOMES.index("inconclusive")] == "1"
    assert lines[-1] == "not run (interrupted): 1"


def test_impl_at_python_parsing() -> None:
    from conformance.cli import parse_impls

    assert parse_impls(["reference", "litgpt@/e/bin/python"], []) == (["reference", "litgpt"],
                                                                       {"litgpt": "/e/bin/python"})
    assert parse_impls(["litgpt"], ["litgpt=/e/bin/python"]) == (["litgpt"], {"litgpt": "/e/bin/python"})
    assert parse_impls(["pkg.mod:attr@/e/py"], []) == (["pkg.mod:attr"], {"pkg.mod:attr": "/e/py"})
    for impls, pythons, words in [(["x@"], [], "both parts"), (["x"], ["x"], "NAME=PATH"),
                                  (["x@/a"], ["x=/b"], "two interpreters"), (["x"], ["y=/b"], "no --impl y")]:
        with pytest.raises(ValueError, match=words):
            parse_impls(impls, pythons)


@pytest.mark.e2e
def test_run_names_the_fix_for_an_interpreter_without_conformance(tmp_path: Path) -> None:
    """An interpreter that exists but cannot import conformance: exit 2 with the pip command.

    The runner finds this checkout through sys.path, not PYTHONPATH, so the other interpreter
    (the system python, in an empty folder) does not see it."""
    base = shutil.which("python3", path="/usr/bin:/bin")
    if base is None or subprocess.run([base, "-c", "import conformance"], cwd=tmp_path, capture_output=True,
                                      env={"PATH": "/usr/bin:/bin"}).returncode == 0:
        pytest.skip("no system python3 without conformance here")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (f"import sys; sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}]; "
            f"from conformance.cli import main; sys.exit(main(['run', '--impl', 'reference@{base}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"interpreter {base} cannot import conformance" in proc.stderr
    assert f"{base} -m pip install --no-deps -e " in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_a_closed_pipe_ends_the_listing_quietly() -> None:
    """`python -m conformance clauses | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import fcntl

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the listing: the writer must wait for us
    proc = subprocess.Popen([sys.executable, "-m", "conformance", "clauses"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        first = reader.readline()
    # the reader left (what `head -1` does after its line) while the listing was still being written
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr  # 128 + SIGPIPE, as a shell reports `ls | head`
    assert first.strip() and stderr == ""


@pytest.mark.e2e
def test_a_report_folder_that_takes_no_file_is_a_usage_error_before_the_run() -> None:
    """/proc/self passes os.access(W_OK) as root; the check creates a file there, as the final write would."""
    got, _stdout, stderr = _probe("run", "--report", "/proc/self/r.json")
    assert got == {"heavy": [], "code": 2}, stderr
    assert "conformance: error: --report /proc/self/r.json: its folder takes no new file" in stderr
