"""Output and failure of the CI commands: one prefix, one exception type. Stdlib only."""

from __future__ import annotations

import sys


class CIError(RuntimeError):
    """A CI command cannot go on; ``python -m conformance.ci`` prints ``error: <message>`` and exits 1."""


def log(msg: str) -> None:
    print(f"ci: {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    log(f"WARNING: {msg}")


def banner(msg: str) -> None:
    bar = "=" * 100
    print(f"{bar}\n{msg}\n{bar}", file=sys.stderr, flush=True)
