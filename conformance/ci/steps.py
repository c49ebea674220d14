"""The step runner: named ``python -m MODULE`` steps run one after another. Stdlib only.

A failing or missing step does not stop the later ones, but :meth:`Steps.finish` fails the whole
run with a per-step summary (also written to ``steps.json``): nothing is skipped silently."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from .interpreters import module_exists
from .log import CIError, banner, log, warn
from .matrix import ROOT


class Steps:
    def __init__(self, python: str, env: dict[str, str], outdir: Path) -> None:
        self.python, self.env, self.outdir = python, env, outdir
        self.rows: list[dict] = []

    def run(self, name: str, module: str, args: list[str], *, success: tuple[int, ...] = (0,),
            artefacts: tuple[str, ...] = (), needs: tuple[str, ...] = (), expect: tuple[str, ...] = ()) -> bool:
        """Run ``python -m module *args``; ``success``: accepted exit codes; ``expect``: files an
        accepted exit must have written (a crash also exits 1); ``needs``: modules that must exist."""
        cmd = [self.python, "-m", module, *args]
        missing = [m for m in (module, *needs) if not module_exists(self.python, m, self.env)]
        if missing:
            banner(f"MISSING: module {', '.join(missing)} does not exist in this checkout/environment: "
                   f"step {name!r} FAILED (not skipped)")
            self.rows.append({"step": name, "status": "missing module", "command": shlex.join(cmd), "seconds": 0})
            return False
        log(f"--- step {name}: {shlex.join(cmd)}")
        for a in expect:  # stale outputs must not pass for this run's
            (self.outdir / a).unlink(missing_ok=True)
        t0 = time.perf_counter()
        rc: int | None = None
        try:
            rc = subprocess.run(cmd, env={**os.environ, **self.env}, cwd=ROOT, stdin=subprocess.DEVNULL).returncode
        except OSError as exc:
            status = f"failed ({exc})"
        else:
            absent = [a for a in expect if not (self.outdir / a).exists()]
            if rc not in success:
                status = f"failed (rc={rc})"
            elif absent:
                status = f"failed (no {', '.join(absent)})"
                warn(f"step {name}: exited {rc} (accepted) but wrote no {', '.join(absent)}: a crash")
            else:
                status = "ok"
        self.rows.append({"step": name, "status": status, "command": shlex.join(cmd), "returncode": rc,
                          "seconds": round(time.perf_counter() - t0, 1),
                          "artefacts": [a for a in artefacts if (self.outdir / a).exists()]})
        return status == "ok"

    def fail(self, name: str, why: str) -> None:
        """Record a failure found after a step (e.g. in its output)."""
        self.rows.append({"step": name, "status": f"failed: {why}", "command": "", "seconds": 0})

    def finish(self, title: str) -> None:
        """Write ``steps.json``, log the summary; CIError when any step failed."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        (self.outdir / "steps.json").write_text(json.dumps(
            {"session": title, "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "steps": self.rows}, indent=1) + "\n")
        width = max((len(r["step"]) for r in self.rows), default=4)
        lines = [f"{title}: step summary (artefacts in {self.outdir})"]
        lines += [f"  {r['step']:<{width}}  {r['status']:<22} {r['seconds']:>7.1f}s" for r in self.rows]
        log("\n".join(lines))
        bad = [r["step"] for r in self.rows if r["status"] != "ok"]
        if bad:
            raise CIError(f"{len(bad)} step(s) failed: {', '.join(bad)}; artefacts in {self.outdir}")
        log(f"all {len(self.rows)} steps ok; artefacts in {self.outdir}")
