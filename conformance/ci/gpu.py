"""``gpu``: what the GPU CI job runs. Steps (each ``python -m ...`` in one environment, artefacts in
one directory): pytest on CUDA, the reference+peft report, the clone probe against the newest CUDA
baseline, the stateful machine on CUDA, the quick benchmark. Stdlib only.

Runs with nox (``nox -s gpu -- --offline``) or without (``python -m conformance.ci gpu --offline
--out DIR``). Fails at once, before installing anything, when no CUDA device is visible."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from . import envs
from .baselines import CLONE_PROBE_BASELINES, newest_baseline
from .interpreters import gpu_visible, module_exists, pick_interpreter, require_cuda, torch_info
from .log import CIError, log, warn
from .options import GPU_STEPS
from .postprocess import summary, summary_lines
from .sessions import BASE_ENV, checkout_env
from .steps import Steps

#: the full benchmark matrix (gpu and bench markers) is the `bench` step's job, and device-independent
#: tooling tests (cpu_only: runner isolation, nox wiring) are the CPU job's; neither runs in `pytest`
PYTEST_MARKERS = "not (gpu and bench) and not cpu_only"


def plan(out: Path, opts: argparse.Namespace) -> list[dict]:
    """The steps: name, module run with -m, its arguments, accepted exit codes, outputs."""
    baseline = newest_baseline(CLONE_PROBE_BASELINES, "cuda")
    conf = ["run", "--impl", "reference", "--impl", "peft", "--device", "cuda",
            "--report", str(out / "conformance.json"), "--markdown", str(out / "conformance.md")]
    for path in opts.xfails or []:
        conf += ["--xfails", path]
    probe = ["probe", "clone", "--device", "cuda", "--quiet", "--json", str(out / "clone_probe.json")]
    if baseline:
        probe += ["--compare", str(baseline)]
    steps = [
        {"name": "pytest", "module": "pytest",
         "args": ["suites", "--device", "cuda", "-m", PYTEST_MARKERS, "-q", "-ra", "-p", "no:cacheprovider",
                  "--junitxml", str(out / "pytest.xml")], "artefacts": ("pytest.xml",)},
        # exit 1 = a MUST clause failed: for PEFT a finding (in the report); for the reference it
        # fails the job (checked from the JSON afterwards)
        {"name": "conformance", "module": "conformance", "args": conf, "success": (0, 1),
         "artefacts": ("conformance.json", "conformance.md"), "expect": ("conformance.json",)},
        {"name": "clone_probe", "module": "conformance", "args": probe, "needs": ("conformance.probe.clone",),
         "artefacts": ("clone_probe.json",), "baseline": str(baseline) if baseline else None},
        {"name": "stateful", "module": "conformance",
         "args": ["stateful", "--impl", "reference", "--device", "cuda", "--examples", str(opts.examples),
                  "--out", str(out / "stateful")], "artefacts": ("stateful",)},
        {"name": "bench", "module": "conformance.bench",
         "args": ["--device", "cuda", "--quick", "--out", str(out / "bench")], "artefacts": ("bench",)},
    ]
    return [st for st in steps if st["name"] in opts.steps]


def _print_plan(steps: list[dict], out: Path, opts: argparse.Namespace, env: dict[str, str]) -> None:
    mode = ("offline (installed packages)" if opts.offline else f"wheels from {opts.wheels} (.nox/gpu-wheels)"
            if opts.wheels else "venv .nox/gpu, pip install -e .[plot,test] (torch unpinned), reused")
    lines = [f"gpu plan: {mode}; artefacts -> {out}"]
    python = pick_interpreter(opts.interpreter, env) if opts.offline else None
    for st in steps:
        missing = [m for m in (st["module"], *st.get("needs", ())) if python and not module_exists(python, m, env)]
        lines.append(f"  {st['name']:<12} python -m {st['module']} {shlex.join(st['args'])}"
                     + (f"\n  {'':<12} MISSING MODULE {', '.join(missing)}: this step will FAIL" if missing else ""))
        if st["name"] == "clone_probe" and not st.get("baseline"):
            lines.append(f"  {'':<12} (no CUDA baseline in baselines/clone_probe/: runs without --compare)")
    print("\n".join(lines), flush=True)


def _environment(opts: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """(python, env) of the run; CIError before any install when no CUDA device is visible."""
    if opts.offline:
        env = checkout_env()
        python = pick_interpreter(opts.interpreter, env)
        require_cuda(python, env, hint="The gpu session needs a CUDA device and a CUDA build of torch.")
        return python, env
    spec = envs.gpu_env(opts.wheels)
    env = checkout_env() if opts.wheels else dict(BASE_ENV)
    pre = torch_info(spec.python) if Path(spec.python).exists() and not opts.fresh else {}
    if pre.get("torch"):  # reused venv: ask the interpreter we will use, before anything else
        if not pre.get("cuda"):
            require_cuda(spec.python, hint=f"(reused venv {spec.path}; --fresh if its torch is wrong)")
    else:
        ok, why = gpu_visible()
        if not ok:
            raise CIError(f"no CUDA device visible: {why}. The gpu session needs a GPU runner; nothing was "
                          "installed. (CPU machine: use `nox -s tests`.)")
        log(f"GPU(s): {why}")
    python = envs.ensure(spec, fresh=opts.fresh)
    require_cuda(python, env, fresh=True, hint="pip installed a torch without CUDA; pass --wheels DIR with a "
                 "CUDA torch wheel, or --offline on a machine that has one.")
    return python, env


def main(opts: argparse.Namespace) -> int:
    opts.steps = [s.strip() for s in opts.steps.split(",") if s.strip()]
    unknown = set(opts.steps) - set(GPU_STEPS)
    if unknown:
        raise CIError(f"unknown --steps {sorted(unknown)}; steps: {', '.join(GPU_STEPS)}")
    out = Path(opts.out).resolve()
    steps = plan(out, opts)
    if opts.plan:
        _print_plan(steps, out, opts, checkout_env() if opts.offline or opts.wheels else dict(BASE_ENV))
        return 0
    python, env = _environment(opts)
    out.mkdir(parents=True, exist_ok=True)
    log(f"artefacts go to {out}")
    run = Steps(python, env, out)
    for st in steps:
        if st["name"] == "clone_probe":
            if st.get("baseline"):
                log(f"clone probe: comparing with the newest CUDA baseline {st['baseline']}")
            else:
                warn("clone probe: no CUDA baseline in baselines/clone_probe/ (a JSON whose environment.device "
                     "is 'cuda'): running WITHOUT --compare. Store this run's clone_probe.json there to compare "
                     "future runs.")
        ok = run.run(st["name"], st["module"], st["args"], success=st.get("success", (0,)),
                     artefacts=st.get("artefacts", ()), needs=st.get("needs", ()), expect=st.get("expect", ()))
        if st["name"] == "conformance" and ok:
            try:
                summ = summary(out / "conformance.json")
            except (ValueError, KeyError) as exc:  # ReportError (a ValueError): unreadable or not a report
                run.fail("conformance[reference]", f"cannot read {out / 'conformance.json'}: {exc}")
                continue
            for line in summary_lines(summ):
                log(line)
            if summ.get("reference", {}).get("must_failures", 0):
                run.fail("conformance[reference]", f"the reference fails {summ['reference']['must_failures']} "
                         "MUST clause(s) on CUDA")
    run.finish("gpu")
    return 0
