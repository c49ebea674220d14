"""nox sessions: the front door. `nox -l` lists them; `nox -s X -- --help` prints the options of X.

Each session is a call of `python -m conformance.ci X` (the same commands run without nox): that
package creates and reuses the environments under .nox/ (one shared CPU environment for tests,
report, bench, compare and stateful; one per matrix cell), runs the steps and reads their results.
The CPU torch pin lives in constraints/cpu.txt alone. docs/nox.md documents every session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # conformance.ci is stdlib-only: nox's interpreter needs no torch for it
from conformance.ci.cell import requested_device, skip_reason  # noqa: E402
from conformance.ci.impls import IMPL_ENVS  # noqa: E402
from conformance.ci.matrix import CELLS, cell  # noqa: E402

nox.options.sessions = ["tests"]
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _ci(session: nox.Session, *args: str) -> None:
    session.run(sys.executable, "-m", "conformance.ci", *args, *session.posargs, external=True,
                env={"PYTHONPATH": PYTHONPATH})


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """CPU: the suite (default all of suites/; paths after -- narrow it) in the shared CPU environment."""
    _ci(session, "tests")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """Main job: the conformance report for the reference implementation (reports/reference.{json,md})."""
    _ci(session, "report")


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff over the package, suites, examples and this file (its own small environment)."""
    _ci(session, "lint")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU CI job: suite on CUDA, reference+peft report, clone probe vs baseline, stateful, quick bench."""
    _ci(session, "gpu")


@nox.session(venv_backend="none")
@nox.parametrize("cell_id", [nox.param(c.id, id=c.id, tags=["matrix", *c.tags]) for c in CELLS])
def matrix(session: nox.Session, cell_id: str) -> None:
    """One version-matrix cell (conformance/ci/matrix.py) in its own reused environment -> reports/matrix/<cell>/."""
    c = cell(cell_id)
    why = None if "--help" in session.posargs or "-h" in session.posargs else skip_reason(
        c, requested_device(c, session.posargs))
    if why:
        session.skip(why)
    _ci(session, "matrix", cell_id)


@nox.session(venv_backend="none")
def matrix_report(session: nox.Session) -> None:
    """Join reports/matrix/<cell>/ into one table (reports/matrix/matrix.{json,md}); --save NAME copies it to baselines/matrix/."""
    _ci(session, "matrix_report")


@nox.session(venv_backend="none")
@nox.parametrize("name", [nox.param(n, id=n) for n in IMPL_ENVS])
def impl(session: nox.Session, name: str) -> None:
    """An implementation in its own environment (.nox/impl-<name>, its pins) -> reports/impls/<name>.{json,md}."""
    _ci(session, "impl", name)


@nox.session(venv_backend="none")
def compare_impls(session: nox.Session) -> None:
    """reference+peft here, litgpt and adapters in .nox/impl-<name>, joined: reports/impls/comparison.{json,md}."""
    _ci(session, "compare_impls")


@nox.session(venv_backend="none")
def regress(session: nox.Session) -> None:
    """Is the clone still needed on this PyTorch? Clone probe + BACKPROP-* clauses vs the stored baseline."""
    _ci(session, "regress")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks: python -m conformance.bench (args after --, e.g. --quick --out reports/bench)."""
    _ci(session, "bench")


@nox.session(venv_backend="none")
def compare(session: nox.Session) -> None:
    """Bench regression compare: nox -s compare -- OLD.json NEW.json (noise-aware; exit 1 on a regression)."""
    _ci(session, "compare")


@nox.session(venv_backend="none")
def stateful(session: nox.Session) -> None:
    """Stateful machine (merge/unmerge/adapter sequences): nox -s stateful -- --examples N [--impl peft]."""
    _ci(session, "stateful")
