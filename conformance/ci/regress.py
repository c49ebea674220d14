"""``regress``: is the defensive clone still needed on this PyTorch? The clone probe (compared with
the newest stored baseline of the device) and the ``BACKPROP-*`` clauses for reference and peft.

With ``--torch V`` it installs torch V with the bitsandbytes, PEFT, transformers and accelerate of
that torch's torch-axis cell (one environment per torch, ``.nox/regress-torch<V>``, reused); without
it the installed torch of ``--interpreter`` / PATH is used and nothing is installed. Stdlib only."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import envs
from .baselines import CLONE_PROBE_BASELINES, device_baselines, previous_baseline
from .interpreters import gpu_visible, pick_interpreter, require_cuda, torch_info, torch_label
from .log import banner, log, warn
from .matrix import CPU_CONSTRAINTS, CPU_TORCH, torch_cell
from .postprocess import verdict_line
from .sessions import BASE_ENV, checkout_env
from .steps import Steps


def regress_env(torch: str, index_url: str | None, gpu_ok: bool) -> envs.EnvSpec:
    c = torch_cell(torch)
    if c is None:
        warn(f"torch {torch} has no torch-axis cell in conformance/ci/matrix.py: bitsandbytes, peft, transformers "
             "and accelerate are whatever pip resolves (unpinned)")
        pins: list[str] = [f"torch=={torch}"]
    else:
        log(f"torch {torch}: pins of matrix cell {c.id}")
        pins = c.pins()
    constraints = (CPU_CONSTRAINTS,) if torch == CPU_TORCH and not gpu_ok else ()
    if not constraints and not gpu_ok and not index_url:
        warn(f"no GPU here: torch {torch} from PyPI is a CUDA build (large download, and it will run on the CPU); "
             "pass --index-url https://download.pytorch.org/whl/cpu for the CPU build")
    options = ("--extra-index-url", index_url) if index_url else ()
    return envs.EnvSpec(f"regress-torch{torch}", (*pins, "-e", ".[test]"), constraints, options)


def main(opts: argparse.Namespace) -> int:
    spec = regress_env(opts.torch, opts.index_url, gpu_visible()[0]) if opts.torch else None
    if opts.plan:
        print(f"regress plan: {'env ' + str(spec.path) + ', pip install ' + ' '.join(spec.pip_args()) if spec else 'installed packages (nothing installed)'}\n"
              "  steps clone_probe (vs the stored baseline of the device's newest torch not newer than this one), backprop_clauses (BACKPROP-*, reference+peft)",
              flush=True)
        return 0
    if spec:
        env = dict(BASE_ENV)
        python = envs.ensure(spec, fresh=opts.fresh)
    else:
        env = checkout_env()
        python = pick_interpreter(opts.interpreter, env)
    info = torch_info(python, env, fresh=True)
    log(f"regress on {torch_label(info)}")
    device = opts.device or ("cuda" if info.get("cuda") else "cpu")
    if device == "cuda":
        require_cuda(python, env)
    out = Path(opts.out).resolve() / f"{device}-torch{info.get('torch')}"
    out.mkdir(parents=True, exist_ok=True)
    baseline = Path(opts.baseline) if opts.baseline else previous_baseline(CLONE_PROBE_BASELINES, device,
                                                                           info.get("torch"))
    run = Steps(python, env, out)
    probe = ["probe", "clone", "--device", device, "--quiet", "--json", str(out / "clone.json")]
    if baseline:
        probe += ["--compare", str(baseline)]
    else:
        warn(f"no stored {device} clone-probe baseline in baselines/clone_probe/: verdict without comparison")
    run.run("clone_probe", "conformance", probe, artefacts=("clone.json",), needs=("conformance.probe.clone",))
    run.run("backprop_clauses", "conformance",
            ["run", "--impl", "reference", "--impl", "peft", "--device", device, "--clauses", "BACKPROP-*",
             "--report", str(out / "backprop.json"), "--markdown", str(out / "backprop.md")],
            success=(0, 1), artefacts=("backprop.json", "backprop.md"), expect=("backprop.json",))
    # the banner: per case against the baseline above, then the count against every other stored one of the device
    line = verdict_line(out / "clone.json", device, baseline, device_baselines(CLONE_PROBE_BASELINES, device))
    if line:
        banner(line)
    else:
        warn("no clone-probe verdict (the probe step failed)")
    run.finish("regress")
    return 0
