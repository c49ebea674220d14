"""pytest integration: ``--impl`` picks implementations, ``--device`` the device; hypothesis profiles; test tiers.

Three tiers (docs/running.md, "Test tiers"): the default one runs in this process; ``e2e`` tests start interpreters
(a ``python`` subprocess, a fork server, ``mp.spawn`` ranks) or send signals; ``slow`` ones are long runs,
skipped unless ``--run-slow`` or ``-m slow``. ``-m "not e2e"`` runs the default tier alone. A test without
the ``e2e`` marker that starts a Python interpreter fails, naming the command and the marker to add
(``_InterpreterGuard``), so the default tier stays in-process.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance")
    group.addoption("--impl", action="append", default=[], help="implementation(s) under test (default: reference; "
                    "or $CONFORMANCE_IMPL)")
    group.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="device for clause checks")
    group.addoption("--xfails", default=None, help="xfail file: lines of 'CLAUSE_ID IMPL_PATTERN reason'")
    group.addoption("--run-slow", action="store_true", help="also run tests marked slow")


class _InterpreterGuard:
    """Records every Python interpreter a test without the ``e2e`` marker starts (``subprocess.Popen`` of a
    ``python*`` executable or of this interpreter, ``multiprocessing`` spawn/forkserver children); the test
    then fails with the command. Installed once per session; it only looks at arguments, never blocks a start."""

    def __init__(self) -> None:
        self.allowed = True  # outside a test (collection, session fixtures' teardown): nothing is recorded
        self.started: list[str] = []
        self._exe = os.path.realpath(sys.executable)

    def is_python(self, program: Any) -> bool:
        program = os.fspath(program)
        return os.path.basename(program).startswith("python") or os.path.realpath(program) == self._exe

    def note(self, argv: list[str]) -> None:
        if not self.allowed:
            self.started.append(shlex.join(argv).replace("\n", "\\n")[:200])

    def install(self) -> None:
        guard, popen_init, spawnv = self, subprocess.Popen.__init__, multiprocessing.util.spawnv_passfds

        def checked_init(popen: subprocess.Popen, args: Any, *a: Any, **kw: Any) -> None:
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            argv = [os.fsdecode(x) if isinstance(x, (bytes, os.PathLike)) else str(x) for x in argv]
            if kw.get("shell") and argv:
                argv = shlex.split(argv[0])
            program = kw.get("executable") or (argv[0] if argv else "")
            if program and guard.is_python(program):
                guard.note(argv)
            popen_init(popen, args, *a, **kw)

        def checked_spawnv(path: Any, args: Any, passfds: Any) -> int:
            guard.note([os.fsdecode(path), *map(str, args[1:])])
            return spawnv(path, args, passfds)

        subprocess.Popen.__init__ = checked_init  # type: ignore[method-assign]
        multiprocessing.util.spawnv_passfds = checked_spawnv


_GUARD = _InterpreterGuard()


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # the suites use tiny shapes: one thread avoids oversubscribing small CI machines
    torch.set_num_threads(int(os.environ.get("CONFORMANCE_TORCH_THREADS", "1")))
    _GUARD.install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False here")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow or -m slow")
    markexpr = config.getoption("-m") or ""
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow") and "slow" not in markexpr:
            item.add_marker(skip_slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _GUARD.allowed, _GUARD.started = item.get_closest_marker("e2e") is not None, []
    try:
        return (yield)
    finally:
        _GUARD.allowed, _GUARD.started = True, []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    if call.when in ("setup", "call") and _GUARD.started and report.outcome != "skipped":
        started, _GUARD.started = _GUARD.started, []
        lines = "\n".join(f"  {cmd}" for cmd in started)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} started a Python interpreter without the e2e marker:\n{lines}\n"
                           "mark it @pytest.mark.e2e (tests that start interpreters, fork servers or spawned "
                           "ranks, or send signals, are the e2e tier; `-m 'not e2e'` runs the rest in-process)"
                           + (f"\n\n{report.longrepr}" if report.longrepr else ""))
    return report


@pytest.fixture(scope="session")
def fork_server() -> Iterator[Callable[[str], Any]]:
    """``fork_server(name)``: the implementation's fork server (``runner.open_implementation``), started once per
    pytest session and shared by every test that runs its clauses (each run still forks its own worker). Only
    for tests about isolation that leave the server as they found it; the checkout is on its PYTHONPATH
    (``conformance.clauses.faults:faults`` and friends)."""
    from conformance.harness import runner

    servers: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:

        def get(name: str) -> Any:
            if name not in servers:
                with pytest.MonkeyPatch.context() as mp:  # the server's environment; its forks inherit it
                    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
                    servers[name] = stack.enter_context(runner.open_implementation(name))
            return servers[name]

        yield get


@pytest.fixture(scope="session")
def reference_results() -> dict[str, Any]:
    """The reference's CPU results in the default tier, by clause, each run once per session
    (``conformance.testing.reference_result``): suites/test_clauses.py and every area's broken-twin tests
    (``conformance.testing.broken_twin_tests``: test_passes_on_reference) judge the same run."""
    return {}


@pytest.fixture(scope="session")
def ddp_reference_result() -> Any:
    """DIST-DDP-GRADS-AGREE for the reference on the CPU, run once per session (two gloo ranks started with
    ``mp.spawn``, each importing torch): suites/test_distributed.py and the clause's test in suites/test_clauses.py
    judge this one result."""
    from conformance.clauses.clause import get
    from conformance.harness.execute import run_clause
    from conformance.impls.reference import ReferenceImplementation

    return run_clause(get("DIST-DDP-GRADS-AGREE"), ReferenceImplementation())


@pytest.fixture(scope="session")
def fsdp_reference_results() -> dict[str, Any]:
    """The DIST-FSDP2-* clauses for the reference on the CPU, by clause, run once per session with one implementation
    object, so the five share one spawned process group (``conformance.clauses.distributed.fsdp_checks``):
    suites/test_fsdp.py and the clauses' tests in suites/test_clauses.py judge these results."""
    from conformance.clauses.clause import registry
    from conformance.clauses.distributed.fsdp_checks import CLAUSES
    from conformance.harness.execute import run_clause
    from conformance.impls.reference import ReferenceImplementation

    impl, clauses = ReferenceImplementation(), registry()
    return {cid: run_clause(clauses[cid], impl) for cid in CLAUSES}
