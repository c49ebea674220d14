"""Report files written whole or not at all. Stdlib only.

A report is written to a temporary file in its target folder and renamed over the target, so a file on
disk is either complete or absent, never truncated, and an earlier report at that path survives a run
that was interrupted while writing. The temporary file is registered with
``conformance.harness.interrupts``: a second Ctrl-C that exits at once removes it first.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from conformance.harness import interrupts


def _temp_in(folder: Path, name: str) -> tuple[int, str]:
    # mode 0o666 minus the umask, as open() gives a new file (mkstemp would give 0o600)
    for _ in range(100):
        path = folder / f".{name}.{os.getpid()}-{time.monotonic_ns() % 10**9}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (OSError on failure;
    the target is then untouched)."""
    target = Path(path)
    fd, tmp = _temp_in(target.parent, target.name)
    key = interrupts.on_emergency(lambda: os.unlink(tmp))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        interrupts.point("write")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        interrupts.forget(key)


def check_writable(path: str, option: str) -> str | None:
    """None if a report can be written at ``path`` (its folder is created); else the one-line usage error.

    The check creates (and removes) a temporary file next to the target, as the final write will, so a
    folder that exists but takes no file (a read-only mount, a pseudo-filesystem) is refused before the run;
    an existing report at ``path`` is not touched."""
    p = Path(path)
    if p.is_dir():
        return f"{option} {path} is a directory; give a file name"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{option} {path}: cannot create its folder ({exc.strerror or exc}); choose another path"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{option} {path}: not writable; choose another path or fix its permissions"
    try:
        fd, tmp = _temp_in(p.parent, p.name)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"{option} {path}: its folder takes no new file ({exc.strerror or exc}); choose another path"
    return None


def write_with_fallback(path: str, text: str) -> tuple[str, str | None]:
    """Write ``text`` to ``path``; if that fails (the folder changed since the check), write it to a fallback
    file in the temporary folder instead. (the path written, a one-line warning or None)."""
    try:
        write_atomic(path, text)
        return path, None
    except OSError as exc:
        why = exc.strerror or str(exc)
    name = Path(path).name
    fd, fallback = tempfile.mkstemp(prefix=f"conformance-{Path(name).stem}-", suffix=Path(name).suffix or ".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return fallback, f"could not write {path} ({why}); wrote it to {fallback} instead"
