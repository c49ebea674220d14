"""Ctrl-C that cannot hang: SIGINT is noted, then acted on at safe points.

Python raises ``KeyboardInterrupt`` at the next bytecode boundary, wherever that is. Inside the
runner that can be right after a lock was taken and before the ``with`` block that releases it
began (e.g. in ``queue.Queue.get`` of the fork server's replies): the exception leaves the lock
held, and the cleanup that follows (killing the worker, waiting for the server's reply) blocks on it
forever. So while a run is under :func:`deferred`, the first SIGINT only sets a flag; the runner's
loops call :func:`check` at points where unwinding is safe, and it raises ``KeyboardInterrupt`` there.

A second SIGINT does not wait for a safe point: it runs the registered emergency actions (kill every
worker process group, remove half-written temporary files) and then either exits the process with
status 130 at once (``hard_exit=True``: the command line) or raises ``KeyboardInterrupt`` (a library
call, e.g. under pytest, whose own handling and exit code must stand).

Fault injection (tests): ``CONFORMANCE_SIGINT_AT=POINT[:N][,POINT[:N]...]`` sends this process a
SIGINT the N-th time (default 1) the run reaches each named point (:data:`POINTS`), so a test drives a
run to an exact place instead of sleeping (two entries: a second Ctrl-C). Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from conformance.core.outcome import EXIT_INTERRUPTED

#: The named points a run passes, in order (what ``CONFORMANCE_SIGINT_AT`` may name).
POINTS = (
    "load",  # an implementation is being loaded (its fork server or interpreter started, not yet answered)
    "loaded",  # it answered: loaded, no clause started yet
    "clause",  # a worker reported a clause's start (the clause is running)
    "between",  # a clause's result was recorded, the next not started
    "hung",  # the current clause has run for a while without a result (a hung worker); N counts polls
    "stop",  # the runner is stopping a worker or a fork server (after the run, or on a Ctrl-C)
    "report",  # the run is over; its report files are about to be written
    "write",  # a report file's text is in its temporary file, not yet renamed over the target
)
_ENV = "CONFORMANCE_SIGINT_AT"

_lock = threading.Lock()
_depth = 0
_requested = 0
_previous: object = None
_hard_exit = False
_actions: dict[int, Callable[[], None]] = {}
_next_key = 0
_seen: dict[str, int] = {}


def requested() -> bool:
    """Has a SIGINT arrived since the outermost :func:`deferred` began?"""
    return _requested > 0


def check() -> None:
    """Raise ``KeyboardInterrupt`` here if a SIGINT was noted: call only where unwinding is safe."""
    if _requested:
        raise KeyboardInterrupt


def on_emergency(action: Callable[[], None]) -> int:
    """Register an action a second SIGINT runs before leaving (kill a process group, remove a file); its key."""
    global _next_key
    with _lock:
        _next_key += 1
        _actions[_next_key] = action
        return _next_key


def forget(key: int) -> None:
    with _lock:
        _actions.pop(key, None)


def run_emergency() -> None:
    """Run every registered action once (each guarded: one failing must not stop the others)."""
    with _lock:
        actions = list(_actions.values())
        _actions.clear()
    for action in actions:
        with contextlib.suppress(Exception):
            action()


def _handler(signum: int, frame: object) -> None:
    global _requested
    _requested += 1
    if _requested == 1:
        return
    run_emergency()
    if _hard_exit:
        with contextlib.suppress(Exception):
            sys.stderr.write("\ninterrupted again: workers killed, exiting now\n")
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred(*, hard_exit: bool = False) -> Iterator[None]:
    """Within it (main thread only; elsewhere a no-op, as no signal reaches another thread), SIGINT is noted
    instead of raised. Nested uses share the outermost handler; ``hard_exit`` applies when outermost.

    It never raises on leaving: a SIGINT noted after the caller's last :func:`check` is for the caller to
    act on (ask :func:`requested` before leaving)."""
    global _depth, _previous, _requested, _hard_exit
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = _depth == 0
    if outer:
        _previous = signal.getsignal(signal.SIGINT)
        _requested, _hard_exit = 0, hard_exit
        _seen.clear()
        signal.signal(signal.SIGINT, _handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if outer:
            signal.signal(signal.SIGINT, _previous if _previous is not None else signal.default_int_handler)
            _requested = 0


def point(name: str) -> None:
    """The run reached ``name`` (one of :data:`POINTS`): fault injection for tests, else nothing."""
    want = os.environ.get(_ENV)
    if not want:
        return
    if name not in POINTS:
        raise ValueError(f"unknown interrupt point {name!r}; known: {', '.join(POINTS)}")
    _seen[name] = _seen.get(name, 0) + 1
    for entry in want.split(","):
        where, _, nth = entry.strip().partition(":")
        if where == name and _seen[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGINT)
