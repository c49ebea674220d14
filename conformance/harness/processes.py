"""The runner's side of worker processes: a fork server per implementation, or fresh interpreters.

``start(opts, python)`` loads the implementation in the interpreter ``python`` and returns a
``Workers``; ``Workers.batch(clauses, events, stderr)`` starts one process running those clauses
(a fork of the server where ``os.fork`` exists, else a fresh ``python -m conformance.harness.worker``)
and returns a ``Batch`` with ``poll()``/``kill()``. Torch-free: it only starts and watches processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from conformance.harness import interrupts
from conformance.harness.worker import Options, options_argv

WORKER = "conformance.harness.worker"


class LoadError(Exception):
    """The implementation could not be loaded (the message is one line for the user)."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a segfault leaves a Python stack in the worker's stderr
    env.setdefault("BITSANDBYTES_NOWELCOME", "1")
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA initialised before a fork
    return env


def fork_available() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def read_events(path: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` after byte ``offset``; (events, new offset)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    complete, sep, _rest = data.rpartition(b"\n")
    if not sep:
        return [], offset
    events = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    return events, offset + len(complete) + 1


def _kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a worker started in a session of its own, and its children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def started(proc: subprocess.Popen) -> int:
    """Register ``proc`` (the leader of its own session) to be killed with its children on a second Ctrl-C."""
    return interrupts.on_emergency(lambda pid=proc.pid: _kill_group(pid))


def wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``proc`` to end, acting on a Ctrl-C at each tick; True if it ended."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        interrupts.check()
        if time.monotonic() >= deadline:
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
    return True


def tail(path: str, n: int = 3) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [ln for ln in fh.read().splitlines() if ln.strip()][-n:]
    except OSError:
        return []


class Batch:
    """One process running a batch of clauses."""

    def poll(self) -> int | None:  # returncode once it ended (negative: killed by that signal)
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class _ProcBatch(Batch):
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._key = started(proc)

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc.pid)
        self.proc.wait()
        interrupts.forget(self._key)


class _ForkBatch(Batch):
    def __init__(self, server: _Server, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exited(self.pid, wait=0)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is not None:
            return
        interrupts.point("stop")
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.returncode = self.server.exited(self.pid, wait=30.0)
        if self.returncode is None:  # the server itself is stuck: it goes, its child with it
            self.server._kill()
            self.returncode = -signal.SIGKILL


class Workers:
    """Where an implementation's batches run; ``info`` is its ``loaded`` event."""

    info: dict[str, Any]
    kind: str  # "fork-server" or "fresh-interpreter"

    def batch(self, clauses: Sequence[str], events: str, stderr: str) -> Batch:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Fresh(Workers):
    """A fresh interpreter per batch (no fork server: where ``os.fork`` is missing)."""

    kind = "fresh-interpreter"

    def __init__(self, opts: Options, python: str, load_timeout_s: float) -> None:
        self.opts, self.python = opts, python
        with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
            events, errlog = os.path.join(tmp, "events.jsonl"), os.path.join(tmp, "stderr.log")
            with open(errlog, "w", encoding="utf-8") as err:
                proc = subprocess.Popen([python, "-m", WORKER, *options_argv(opts), "--events", events,
                                         "--describe"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err, env=_env(), start_new_session=True)
            key = started(proc)
            try:
                interrupts.point("load")
                if not wait(proc, load_timeout_s):
                    raise LoadError(f"implementation {opts.impl!r} did not load within {load_timeout_s:.0f}s")
            finally:  # a load error, or Ctrl-C while loading: it must not outlive this
                _kill_group(proc.pid)
                proc.wait()
                interrupts.forget(key)
            evs, _ = read_events(events, 0)
            self.info = _loaded(opts.impl, evs, proc.returncode, tail(errlog, 1))
        interrupts.point("loaded")

    def batch(self, clauses: Sequence[str], events: str, stderr: str) -> Batch:
        with open(stderr, "a", encoding="utf-8") as err:
            proc = subprocess.Popen([self.python, "-m", WORKER, *options_argv(self.opts), "--events", events,
                                     "--clauses", ",".join(clauses)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, env=_env(), start_new_session=True)
        return _ProcBatch(proc)


def _loaded(impl: str, evs: list[dict[str, Any]], returncode: int | None, last: list[str]) -> dict[str, Any]:
    for ev in evs:
        if ev["event"] == "fatal":
            raise LoadError(ev["message"])
        if ev["event"] == "loaded":
            return ev
    raise LoadError(f"implementation {impl!r} could not be loaded (worker {describe_exit(returncode)}): "
                    f"{(last or ['no output'])[0]}")


class _Server(Workers):
    """A fork server (``conformance.harness.zygote``) and the replies it sends."""

    kind = "fork-server"

    def __init__(self, opts: Options, python: str, load_timeout_s: float, tmp: str) -> None:
        self.errlog = os.path.join(tmp, "server-stderr.log")
        with open(self.errlog, "w", encoding="utf-8") as err:
            # a session of its own: a Ctrl-C at the terminal reaches the runner, which stops the server
            self.proc = subprocess.Popen([python, "-m", WORKER, *options_argv(opts), "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=_env(), start_new_session=True)
        self._key = started(self.proc)  # a second Ctrl-C kills it and its child (one process group)
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._exits: dict[int, int] = {}
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        try:
            interrupts.point("load")
            first = self._next(load_timeout_s, interruptible=True)
            if first is None:
                # None also means the server closed its stdout (it died while loading): give the exit a moment
                # to be reaped, so a crash is reported as a crash and not as a load timeout
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
                if self.proc.poll() is None:
                    raise LoadError(f"implementation {opts.impl!r} did not load within {load_timeout_s:.0f}s")
                raise LoadError(f"implementation {opts.impl!r} could not be loaded (worker "
                                f"{describe_exit(self.proc.returncode)}): "
                                f"{(tail(self.errlog, 1) or ['no output'])[0]}")
            self.info = _loaded(opts.impl, [first], self.proc.poll(), tail(self.errlog, 1))
        except BaseException:  # a load error, or Ctrl-C while loading: the server must not outlive it
            self._kill()
            raise
        interrupts.point("loaded")

    def _kill(self) -> None:
        _kill_group(self.proc.pid)
        self.proc.wait()
        interrupts.forget(self._key)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if line.strip():
                self.replies.put(json.loads(line))
        self.replies.put(None)

    def _next(self, timeout: float, interruptible: bool = False) -> dict[str, Any] | None:
        """The next reply within ``timeout`` s (None: none came, or the server closed its stdout); an
        ``interruptible`` wait acts on a Ctrl-C at each tick (cleanup waits must not)."""
        deadline = time.monotonic() + timeout
        while True:
            if interruptible:
                interrupts.check()
            try:
                return self.replies.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None

    def exited(self, pid: int, wait: float) -> int | None:
        """The child's returncode once the server reported it (waiting up to ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while pid not in self._exits:
            ev = self._next(max(0.0, deadline - time.monotonic())) if wait else self._nowait()
            if ev is None:
                if self.proc.poll() is not None:  # the server died: so did (or will) its child
                    return self.proc.returncode if self.proc.returncode < 0 else -signal.SIGKILL
                return None
            if ev["event"] == "exited":
                self._exits[ev["pid"]] = ev["returncode"]
        return self._exits.pop(pid)

    def _nowait(self) -> dict[str, Any] | None:
        try:
            return self.replies.get_nowait()
        except queue.Empty:
            return None

    def batch(self, clauses: Sequence[str], events: str, stderr: str) -> Batch:
        cmd = {"op": "fork", "clauses": list(clauses), "events": events, "stderr": stderr}
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise LoadError(f"the fork server exited ({describe_exit(self.proc.poll())}): "
                            f"{(tail(self.errlog, 1) or ['no output'])[0]}") from None
        ev = self._next(60.0, interruptible=True)
        if ev is None or ev["event"] != "forked":
            raise LoadError(f"the fork server did not fork ({ev or describe_exit(self.proc.poll())})")
        return _ForkBatch(self, ev["pid"])

    def close(self) -> None:
        if self.proc.poll() is None:
            interrupts.point("stop")
            try:
                self.proc.stdin.close()  # EOF: the server kills a running child and ends
            except OSError:
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._kill()  # its process group: nothing it forked outlives it


def start(opts: Options, tmp: str, python: str = sys.executable, load_timeout_s: float = 300.0,
          fork: bool | None = None) -> Workers:
    """Load ``opts.impl`` in ``python``; a fork server unless ``fork`` is False or fork is unavailable."""
    if fork is None:
        fork = fork_available()
    if fork:
        server = _Server(opts, python, load_timeout_s, tmp)
        if server.info.get("forkable", True):
            return server
        server.close()  # loading initialised CUDA: children of that server could not use it
    return _Fresh(opts, python, load_timeout_s)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
