"""The fork server ("zygote"): one long-lived process per implementation that forks a child per batch.

It imports torch, bitsandbytes, the check modules and the implementation once (``worker.prepare``)
and never initialises CUDA (``torch.cuda.is_available()`` goes through NVML, nothing else is
called), so its children can. Protocol, one JSON object per line:

- replies on stdout (the real stdout: imports that print are sent to stderr): ``{"event": "loaded",
  ...}`` or ``{"event": "fatal", "message"}`` once, then per command ``{"event": "forked", "pid"}``
  and, when that child ends, ``{"event": "exited", "pid", "returncode"}`` (negative: killed by that
  signal, as ``subprocess``);
- commands on stdin: ``{"op": "fork", "clauses": [...], "events": PATH, "stderr": PATH}``; the
  child appends its clause events to ``events`` and its stderr to ``stderr``. End of stdin (the
  runner closed it, or died) kills a running child and ends the server.

The runner kills a child past its clause's timeout with SIGKILL (it knows the pid); the server
reaps it and replies ``exited``. One child at a time.
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import sys
import traceback
from typing import IO, Any

from conformance.harness import worker


def _reply(out: IO[str], event: dict[str, Any]) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def _child(impl: Any, opts: worker.Options, cmd: dict[str, Any], keep: list[int]) -> None:
    """In the forked child: rewire stdio, run the batch, leave without running the server's cleanup."""
    code = 0
    try:
        for fd in keep:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        err = os.open(cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(err, 2)
        os.close(devnull)
        os.close(err)
        faulthandler.enable()  # a segfault leaves its Python stack in the batch's stderr file
        worker.run_batch(impl, opts, list(cmd["clauses"]), cmd["events"])
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the server loop
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, commands: IO[str]) -> int:
    """Wait for child ``pid``; kill it if the runner goes away (stdin at EOF). Its returncode."""
    stdin_open = True
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if stdin_open:
            ready, _, _ = select.select([commands], [], [], 0.05)
            if ready and not os.read(commands.fileno(), 1 << 16):
                stdin_open = False
                os.kill(pid, signal.SIGKILL)
        else:
            done, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)


def serve(opts: worker.Options) -> int:
    # replies go to a private copy of stdout; whatever imports or implementations print lands on stderr
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle
    try:
        impl, loaded = worker.prepare(opts)
    except worker.LoadFailure as exc:
        _reply(out, {"event": "fatal", "message": str(exc)})
        return 3
    import torch

    # an implementation that initialised CUDA while loading cannot be forked from: the runner then
    # falls back to a fresh interpreter per batch
    _reply(out, {**loaded, "forkable": not torch.cuda.is_initialized()})
    commands = sys.stdin
    while True:
        line = commands.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("op") != "fork":
            _reply(out, {"event": "fatal", "message": f"unknown fork-server command {cmd!r}"})
            return 3
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _child(impl, opts, cmd, keep=[out.fileno()])
        _reply(out, {"event": "forked", "pid": pid})
        _reply(out, {"event": "exited", "pid": pid, "returncode": _wait(pid, commands)})
