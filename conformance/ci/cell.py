"""``matrix CELL``: one cell of the version matrix in its own environment (``.nox/matrix-<cell.id>``,
created once and reused while the cell's pins stand). Writes ``<out>/<cell.id>/``: ``cell.json``
(pins, installed versions, step status), ``conformance.json/.md`` and, for the bnb and torch axes,
``clone.json``. Stdlib only."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from collections.abc import Sequence
from pathlib import Path

from . import envs
from .interpreters import gpu_visible, installed_versions, require_cuda, torch_info, torch_label
from .log import CIError, log
from .matrix import CPU_CONSTRAINTS, Cell, cell
from .matrix_report import VERSIONS
from .postprocess import summary, summary_lines
from .sessions import BASE_ENV
from .steps import Steps


def cell_env(c: Cell, device: str) -> envs.EnvSpec:
    """The cell's environment; a CPU cell on CPU takes torch under constraints/cpu.txt (the +cpu build)."""
    constraints = (CPU_CONSTRAINTS,) if device == "cpu" and not c.needs_gpu else ()
    # [test]: the clause modules import hypothesis, so `python -m conformance run` needs it
    return envs.EnvSpec(f"matrix-{c.id}", (*c.pins(), "-e", ".[test]"), constraints)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def requested_device(c: Cell, args: Sequence[str]) -> str:
    """The device a run of ``c`` with these command-line arguments asks for: ``--device X`` (or ``--device=X``) when
    given, else cuda for a GPU cell and cpu for the others (what :func:`main` defaults to)."""
    for i, a in enumerate(args):
        if a == "--device" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cuda" if c.needs_gpu else "cpu"


def skip_reason(c: Cell, device: str) -> str | None:
    """Why this cell cannot run here (a GPU cell without a visible GPU), or None."""
    if device != "cuda" and (not c.needs_gpu or c.cpu_runnable):
        return None  # a CUDA-build torch cell asked for --device cpu runs on the CPU (its bnb has a CPU backend)
    ok, why = gpu_visible()
    return None if ok else (
        f"{c.id} is a GPU CI cell (torch {c.torch} from PyPI is a CUDA build; device {device}) and no CUDA device "
        f"is visible here: {why}. It runs on the self-hosted GPU runner (.github/workflows/gpu.yml, torch-axis job)"
        + ("; `--device cpu` runs it on this CPU (its bitsandbytes has the CPU backend)" if c.cpu_runnable else
           f"; bitsandbytes {c.bnb} has no CPU backend") + ".")


def main(opts: argparse.Namespace) -> int:
    try:
        c = cell(opts.cell)
    except KeyError as exc:
        raise CIError(str(exc.args[0])) from None
    device = opts.device or ("cuda" if c.needs_gpu else "cpu")
    spec = cell_env(c, device)
    out = Path(opts.out).resolve() / c.id
    if opts.plan:
        print(f"cell {c.id} ({', '.join(c.tags)}) on {device}\n  env   {spec.path} (reused while its pins stand)\n"
              f"  pip   install {' '.join(spec.pip_args())}\n  runs  conformance run --impl "
              f"{' --impl '.join(c.impls)}" + (" + clone probe" if c.probe else "") + f"\n  out   {out}", flush=True)
        return 0
    why = skip_reason(c, device)
    if why:  # not a failure (the GPU runner runs it), but said loudly; nox reports the session skipped
        log(f"SKIPPED: {why}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*c.files, "clone.json", "conformance.md"):
        (out / stale).unlink(missing_ok=True)
    meta = {**c.to_json(), "device": device, "files": list(c.files), "status": "installing", "started_at": _now(),
            "steps": {}}

    def save() -> None:
        (out / "cell.json").write_text(json.dumps(meta, indent=1) + "\n")

    save()
    log(f"cell {c.id}: {' '.join(c.pins())} on {device}; reports -> {out}")
    t0 = time.perf_counter()
    try:
        python = envs.ensure(spec, fresh=opts.fresh)
    except CIError:
        meta["status"] = "install failed"
        save()
        raise
    installed = installed_versions(python, VERSIONS)
    log(f"cell {c.id}: {torch_label(torch_info(python, fresh=True))}")
    meta.update(installed=installed, environment_seconds=round(time.perf_counter() - t0, 1))
    wrong = {p.split("==")[0]: (p.split("==")[1], installed.get(p.split("==")[0].replace("-", "_")))
             for p in c.pins()}
    wrong = {k: v for k, v in wrong.items() if (v[1] or "").split("+")[0] != v[0]}
    if wrong:
        meta["status"] = "wrong versions installed"
        save()
        raise CIError(f"cell {c.id}: the venv has " + ", ".join(f"{k} {g} (asked {w})" for k, (w, g) in wrong.items())
                      + f"; rerun with --fresh (removes {spec.path})")
    if device == "cuda":
        require_cuda(python, fresh=True, hint=f"cell {c.id} installed a torch that cannot use the GPU.")
    run = Steps(python, dict(BASE_ENV), out)
    impls = [a for i in c.impls for a in ("--impl", i)]
    conf_ok = run.run("conformance", "conformance",
                      ["run", *impls, "--device", device, "--report", str(out / "conformance.json"),
                       "--markdown", str(out / "conformance.md")],
                      success=(0,) if opts.strict else (0, 1), artefacts=("conformance.json", "conformance.md"),
                      expect=("conformance.json",))
    meta["steps"]["conformance"] = run.rows[-1]["status"]
    if c.probe:
        run.run("clone_probe", "conformance", ["probe", "clone", "--device", device, "--quiet",
                                               "--json", str(out / "clone.json")], artefacts=("clone.json",),
                needs=("conformance.probe.clone",))
        meta["steps"]["clone_probe"] = run.rows[-1]["status"]
    meta["status"] = "ok" if all(r["status"] == "ok" for r in run.rows) else "step failed"
    if conf_ok:
        summ = summary(out / "conformance.json")
        meta["must_failures"] = {k: v.get("must_failures", 0) for k, v in summ.items()}
        meta["summary"] = summ
        for line in summary_lines(summ):
            log(line)
    meta["finished_at"] = _now()
    meta["seconds"] = {r["step"]: r["seconds"] for r in run.rows}
    save()
    run.finish(c.session)
    return 0
