"""The command line of ``python -m conformance.ci``: one subcommand per nox session, same name.

nox sessions pass everything after ``--`` here, so ``nox -s X -- --help`` prints the options of
``X`` (these parsers) and exits 0. Commands that wrap another tool (``tests``: pytest, ``bench``,
``compare``, ``stateful``, ``report``) forward the arguments they do not know. Stdlib only."""

from __future__ import annotations

import argparse

from .matrix import CELLS

GPU_STEPS = ("pytest", "conformance", "clone_probe", "stateful", "bench")
#: commands whose unknown arguments go to the wrapped tool
FORWARDING = {"tests": "pytest", "report": "python -m conformance run", "bench": "python -m conformance.bench",
              "compare": "python -m conformance.bench.compare", "stateful": "python -m conformance stateful",
              "impl": "python -m conformance run", "compare_impls": "python -m conformance run"}


def _fresh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fresh", action="store_true", help="remove the environment and install it again")


def build() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance.ci", allow_abbrev=False,
                                description="CI steps behind the nox sessions (run them with or without nox).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        if name in FORWARDING:
            epilog = (epilog + " " if epilog else "") + f"Other arguments go to `{FORWARDING[name]}`."
        return sub.add_parser(name, help=help, description=help, epilog=epilog, allow_abbrev=False)

    t = add("tests", "CPU: pytest in the shared CPU environment (.nox/cpu-torch<pin>)",
            "Paths among the arguments narrow the run (default: suites).")
    _fresh(t)
    r = add("report", "conformance report of the reference -> reports/reference.{json,md}")
    _fresh(r)
    li = add("lint", "ruff check over conformance, suites, examples, noxfile.py (own small environment)")
    _fresh(li)
    li.add_argument("paths", nargs="*", help="what to check (default: conformance suites examples noxfile.py)")
    for name, what in (("bench", "benchmarks"), ("stateful", "the stateful machine")):
        b = add(name, f"{what}: the shared CPU environment here, .nox/gpu where nvidia-smi lists a GPU")
        _fresh(b)
    c = add("compare", "noise-aware bench comparison: compare OLD.json NEW.json [--threshold X] (exit 1 on a regression)")
    _fresh(c)

    g = add("gpu", "GPU CI: suite on CUDA, reference+peft report, clone probe vs baseline, stateful, quick bench")
    g.add_argument("--offline", action="store_true", help="use the installed torch/bnb/peft of an existing "
                   "interpreter, install nothing; the checkout is used in place (PYTHONPATH)")
    g.add_argument("--interpreter", default=None, help="with --offline: the python that has torch (default: the "
                   "first of python, python3 on PATH and this interpreter that imports torch)")
    g.add_argument("--wheels", default=None, metavar="DIR", help="install the requirements from DIR only "
                   "(pip --no-index --find-links DIR); the checkout is used in place")
    g.add_argument("--out", "--reports-dir", dest="out", default="reports/gpu", metavar="DIR",
                   help="artefact directory (default reports/gpu)")
    g.add_argument("--examples", type=int, default=100, help="stateful examples per case (default 100)")
    g.add_argument("--xfails", action="append", default=None, metavar="FILE",
                   help="expected-failure list for `conformance run` (repeatable)")
    g.add_argument("--steps", default=",".join(GPU_STEPS), help=f"a subset of {','.join(GPU_STEPS)}")
    g.add_argument("--plan", action="store_true", help="print the steps, the baseline and missing modules; exit")
    _fresh(g)

    m = add("matrix", "one matrix cell: its own reused environment, conformance report (+ clone probe)",
            "Cells: `python -m conformance.ci list`.")
    m.add_argument("cell", metavar="CELL", help=f"cell id (every pin in its name), e.g. {CELLS[0].id}")
    m.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cpu for the CPU-torch cells, cuda for the others")
    m.add_argument("--strict", action="store_true", help="a failing MUST clause fails the cell (default: a "
                   "finding recorded in the table)")
    m.add_argument("--out", default="reports/matrix", help="directory of cell directories (default reports/matrix)")
    m.add_argument("--plan", action="store_true", help="print the pins, the environment and the steps; exit")
    _fresh(m)

    mr = add("matrix_report", "join reports/matrix/<cell>/ into reports/matrix/matrix.{json,md}")
    mr.add_argument("--in", dest="root", default="reports/matrix", help="directory of cell directories")
    mr.add_argument("--save", default=None, metavar="NAME", help="also copy to baselines/matrix/NAME.{json,md}")
    mr.add_argument("--tag", default=None, help="only the cells with this tag (e.g. peft-axis); others are left out")
    mr.add_argument("--no-joined", dest="joined", action="store_false", help="with --save: do not regenerate "
                    "baselines/matrix/joined.{json,md} (every stored axis joined)")

    jo = add("joined", "every stored axis table of baselines/matrix/ joined into baselines/matrix/joined.{json,md}: "
             "outcomes per cell and, per clause, the first cell where it changes along each axis and what changed")
    jo.add_argument("--check", action="store_true", help="write nothing; exit 1 when the stored joined table is not "
                    "what the stored axis tables give")
    jo.add_argument("--dir", default=None, help="directory of the axis tables (default baselines/matrix)")

    im = add("impl", "one implementation in its own environment (.nox/impl-NAME) -> reports/impls/NAME.{json,md}")
    im.add_argument("name", metavar="NAME", help="implementation with its own environment, e.g. litgpt")
    im.add_argument("--plan", action="store_true", help="ensure the environment, print its python; exit")
    _fresh(im)
    ci = add("compare_impls", "reference+peft here, litgpt and adapters in .nox/impl-NAME, joined side by side -> "
             "reports/impls/comparison.{json,md}")
    _fresh(ci)

    ls = add("list", "the matrix cells (Markdown table, or --json)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--tag", default=None, help="only cells with this tag (e.g. peft-axis)")

    rg = add("regress", "is the clone still needed on this PyTorch? clone probe + BACKPROP-* clauses vs baseline")
    rg.add_argument("--torch", default=None, help="install this torch with the bitsandbytes and companions of its "
                    "torch-axis cell (reused .nox/regress-torch<V>); without it the installed torch of "
                    "--interpreter / PATH is used and nothing is installed")
    rg.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if usable")
    rg.add_argument("--interpreter", default=None, help="without --torch: the python that has torch")
    rg.add_argument("--index-url", default=None, help="extra index for the torch install (e.g. "
                    "https://download.pytorch.org/whl/cpu)")
    rg.add_argument("--baseline", default=None, help="default: the baselines/clone_probe/*.json of the device whose "
                    "torch is the newest not newer than this one (else the newest); the banner counts against all")
    rg.add_argument("--out", default="reports/regress", help="default reports/regress")
    rg.add_argument("--plan", action="store_true", help="print the pins and the steps; exit")
    _fresh(rg)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, forwarded arguments); forwarding only for FORWARDING commands (others: usage error)."""
    p = build()
    opts, rest = p.parse_known_args(argv)
    if rest and opts.cmd not in FORWARDING:
        p.error(f"{opts.cmd}: unrecognized arguments: {' '.join(rest)}")
    return opts, rest
