"""Write a shrunk failing sequence as a standalone, runnable reproducer script.

The script embeds the layer configuration and the steps as data, lists them as the plain calls
they make, and replays them with :func:`conformance.spec.stateful.machine.replay` (which builds the
layer through the implementation protocol and checks every invariant after every step), printing
each step and then the divergence. Exit status 1 when the violation reproduces, 0 otherwise.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from conformance.spec.interface import Implementation

    from .machine import Failure


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


def script_text(impl: Implementation, failure: Failure, device: str) -> str:
    from .machine import impl_spec, render_step

    spec = impl_spec(impl)
    vers = versions(impl)
    steps = [s for s in failure.trace if s["op"] != "create"]
    plain = "\n".join(f"    {i}. {render_step(s)}" for i, s in enumerate(failure.trace))
    path = _impl_path(impl)
    head = [
        "#!/usr/bin/env python",
        f'"""Reproducer: {failure.clause} violated by implementation {impl.name!r} on {device}.',
        "",
        "Found by the stateful conformance machine (conformance.spec.stateful), shrunk by hypothesis.",
        "",
        "Violation:",
        *[f"    {line}" for line in _wrap(failure.message)],
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "Minimal sequence (the calls made on the layer):",
        plain,
        "",
        "Run: python {this file} [--device cpu|cuda]  (exit 1 when the divergence reproduces, 0 when it does not)",
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
        "from conformance.spec.stateful.reproducer import reproduce",
        "",
        f"CONFIG = json.loads({json.dumps(json.dumps(failure.config))})",
        f"STEPS = json.loads({json.dumps(json.dumps(steps))})",
        "",
        'if __name__ == "__main__":',
        f"    sys.exit(reproduce({spec!r}, {failure.clause!r}, CONFIG, STEPS, {device!r}, sys.argv[1:]))",
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


def write_reproducer(impl: Implementation, failure: Failure, device: str, directory: str) -> str:
    """Write the script into ``directory``; its path."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{impl.name}_{failure.clause}_{failure.config.get('method')}"
                   f"{failure.config.get('bits')}bit")
    path = os.path.join(directory, f"reproduce_{label}.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(script_text(impl, failure, device))
    return path


def reproduce(impl_spec: str, clause: str, config: dict[str, Any], steps: list[dict[str, Any]], device: str,
              argv: Sequence[str] = ()) -> int:
    """What a reproducer script runs: replay ``steps`` on ``impl_spec`` and print the divergence.

    ``--device cpu|cuda`` in ``argv`` replays on another device than the one the failure was found on.
    Exit status 1 when the divergence reproduces, 0 when it does not.
    """
    from conformance.harness.loader import load
    from conformance.spec.stateful.machine import replay

    argv = list(argv)
    if "--device" in argv:
        device = argv[argv.index("--device") + 1]
    impl = load(impl_spec)
    print(f"implementation {impl.name} {impl.version()} on {device}; replaying {len(steps)} steps")
    violation = replay(impl, config, steps, device=device, verbose=lambda s: print("  >", s))
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
