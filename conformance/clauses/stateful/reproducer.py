"""Write a shrunk failing sequence as a standalone, runnable reproducer script.

The script embeds the layer configuration and the steps as data, lists them as the plain calls
they make, rebuilds the implementation from the string it was loaded from
(``conformance.harness.loader.load(TARGET)``, constructor arguments included when it was given as
``module:attr``) and replays the steps with :func:`conformance.clauses.stateful.shrink.replay` (which
builds the layer through the implementation protocol and checks every invariant after every step),
printing each step and then the divergence. Exit status 1 when the violation reproduces, 0 when it
does not, 2 when it cannot be replayed here.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from conformance.clauses.interface import Implementation

    from .run import Failure


def versions(impl: Implementation) -> dict[str, str]:
    import bitsandbytes

    import conformance

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
           "conformance": conformance.__version__, f"implementation {impl.name}": str(impl.version())}
    try:
        import peft

        out["peft"] = peft.__version__
    except Exception:  # pragma: no cover - peft optional
        pass
    return out


def _impl_path(impl: Implementation) -> str | None:
    """Directory to put on sys.path so the script can import an implementation defined outside the package."""
    mod = type(impl).__module__
    if mod.startswith("conformance."):
        return None
    try:
        return os.path.dirname(os.path.abspath(inspect.getfile(type(impl))))
    except (TypeError, OSError):
        return None


def script_text(impl: Implementation, failure: Failure, device: str, target: str | None = None) -> str:
    from .ops import render_step
    from .run import impl_target

    spec, keeps_args = impl_target(impl, target)
    vers = versions(impl)
    steps = [s for s in failure.trace if s["op"] != "create"]
    plain = "\n".join(f"    {i}. {render_step(s)}" for i, s in enumerate(failure.trace))
    path = _impl_path(impl)
    head = [
        "#!/usr/bin/env python",
        f'"""Reproducer: {failure.clause} violated by implementation {impl.name!r} on {device}'
        + (f" (by a {failure.kind} step)." if failure.kind else "."),
        "",
        "Found by the stateful conformance machine (conformance.clauses.stateful), shrunk by hypothesis.",
        "",
        "Violation:",
        *[f"    {line}" for line in _wrap(failure.message)],
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "Minimal sequence (the calls made on the layer):",
        plain,
        "",
        *(["Drawn values the finding needs (other draws do not show it):",
           *[f"    {line}" for d in failure.depends for line in _wrap(d)], ""] if failure.depends else []),
        "Run: python {this file} [--device cpu|cuda] [--hash-seeds N]  (exit 1 when the divergence reproduces, 0 when",
        "it does not, 2 when it cannot be replayed here; --hash-seeds N lists the PYTHONHASHSEED values of 0..N-1",
        "that show it, for a finding that depends on set iteration order)",
        '"""',
        "import json",
        "import sys",
        "",
    ]
    import conformance

    # the checkout (Path(conformance.__file__).parents[1]): the script runs from anywhere, whether the
    # package is pip-installed or only on PYTHONPATH where it was written
    root = os.path.dirname(os.path.dirname(os.path.realpath(conformance.__file__)))
    head += [f"sys.path.insert(0, {root!r})  # the conformance checkout that wrote this script", ""]
    if path:
        head += [f"sys.path.insert(0, {path!r})  # where the implementation under test is defined", ""]
    body = [
        "from conformance.harness.loader import load",
        "from conformance.clauses.stateful.reproducer import reproduce",
        "",
        f"TARGET = {spec!r}" + ("" if keeps_args else
                               "  # rebuilt from its class without arguments: give module:attr of the configured object"),
        f"CLAUSE = {failure.clause!r}",
        f"HASHSEED = {os.environ.get('PYTHONHASHSEED') or None!r}  # PYTHONHASHSEED of the run that found it "
        "(None: random; try --hash-seeds N)",
        f"CONFIG = json.loads({json.dumps(json.dumps(failure.config))})",
        f"STEPS = json.loads({json.dumps(json.dumps(steps))})",
        "",
        'if __name__ == "__main__":',
        f"    sys.exit(reproduce(load(TARGET), CLAUSE, CONFIG, STEPS, {device!r}, sys.argv[1:], HASHSEED))",
        "",
    ]
    return "\n".join(head + body)


def _wrap(text: str, width: int = 110) -> list[str]:
    text = text.replace('"""', "'''")
    out, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width and line:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out


def write_reproducer(impl: Implementation, failure: Failure, device: str, directory: str,
                     target: str | None = None) -> str:
    """Write the script into ``directory``; its path."""
    kind = f"_{failure.kind}" if failure.kind else ""  # one script per (clause, step kind, case)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{impl.name}_{failure.clause}{kind}_{failure.config.get('method')}"
                   f"{failure.config.get('bits')}bit")
    path = os.path.join(directory, f"reproduce_{label}.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(script_text(impl, failure, device, target))
    return path


def _hash_sweep(n: int, argv: list[str]) -> int:
    """Re-run this script under PYTHONHASHSEED=0..n-1 (set iteration order, e.g. PEFT's mixed batches)."""
    shows = []
    for h in range(n):
        proc = subprocess.run([sys.executable, os.path.abspath(sys.argv[0]), *argv], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h), HASHSEED_FORCE: "1"}, check=False)
        if proc.returncode == 1:
            shows.append(h)
    print(f"PYTHONHASHSEED values that show the divergence: {shows or 'none'} (of 0..{n - 1})")
    return 1 if shows else 0


#: set by a hash sweep: run under the PYTHONHASHSEED given, not the script's HASHSEED
HASHSEED_FORCE = "CONFORMANCE_REPRODUCE_HASHSEED_GIVEN"


def reproduce(impl: Implementation, clause: str, config: dict[str, Any], steps: list[dict[str, Any]], device: str,
              argv: Sequence[str] = (), hashseed: str | None = None) -> int:
    """What a reproducer script runs: replay ``steps`` on ``impl`` and print the divergence.

    ``--device cpu|cuda`` in ``argv`` replays on another device than the one the failure was found on;
    ``--hash-seeds N`` re-runs the script under PYTHONHASHSEED=0..N-1 and lists those that show it (a
    finding that depends on set iteration order inside the implementation). ``hashseed``: the
    PYTHONHASHSEED the finding needs (the script re-executes itself under it).
    Exit status 1 when the divergence reproduces, 0 when it does not, 2 when the sequence cannot be
    replayed here (a CUDA sequence without a CUDA device, a step the machine could not have drawn).
    """
    from .config import MachineConfig, StepNotApplicable
    from .shrink import replay

    argv = list(argv)
    if "--hash-seeds" in argv:
        i = argv.index("--hash-seeds")
        return _hash_sweep(int(argv[i + 1]), argv[:i] + argv[i + 2:])
    if hashseed is not None and os.environ.get("PYTHONHASHSEED") != hashseed and not os.environ.get(HASHSEED_FORCE):
        script = os.path.abspath(sys.argv[0])
        os.execve(sys.executable, [sys.executable, script, *argv], {**os.environ, "PYTHONHASHSEED": hashseed})
    if os.environ.get("PYTHONHASHSEED"):
        print(f"PYTHONHASHSEED={os.environ['PYTHONHASHSEED']}")
    if "--device" in argv:
        device = argv[argv.index("--device") + 1]
    needs_cuda = device.startswith("cuda") or any(s["op"] == "device_move" for s in steps)
    if needs_cuda and not torch.cuda.is_available():
        print(f"cannot replay here: the sequence runs on CUDA (device {device!r}"
              f"{', a device move' if any(s['op'] == 'device_move' for s in steps) else ''}) and no CUDA device "
              "is visible")
        return 2
    unavailable = MachineConfig.from_dict(config).base.unavailable(device)
    if unavailable is not None:  # a base with bitsandbytes' CPU packed layout, where that layout does not exist
        print(f"cannot replay here: {unavailable}")
        return 2
    print(f"implementation {impl.name} {impl.version()} on {device}; replaying {len(steps)} steps")
    try:
        violation = replay(impl, config, steps, device=device, verbose=lambda s: print("  >", s))
    except StepNotApplicable as exc:
        print(f"cannot replay here: {exc}")
        return 2
    if violation is None:
        print("no violation: the divergence does not reproduce")
        return 0
    print(f"DIVERGENCE ({violation.clause}): {violation.message}")
    if violation.clause != clause:
        print(f"(recorded as {clause})")
    return 1


def load_steps(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, steps) embedded in a reproducer script (for tooling)."""
    ns: dict[str, Any] = {}
    src = open(path, encoding="utf-8").read()
    for name in ("CONFIG", "STEPS"):
        m = re.search(rf"^{name} = json\.loads\((.*)\)$", src, re.M)
        if m:
            ns[name] = json.loads(json.loads(m.group(1)))
    return ns.get("CONFIG", {}), ns.get("STEPS", [])
