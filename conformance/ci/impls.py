"""Implementations in their own environments, and the side-by-side comparison. Stdlib only.

``impl NAME``: creates (once; reused while its pins stand) ``.nox/impl-NAME`` with the pins the
implementation needs, which conflict with the main environment's (LitGPT 0.5.13 caps
``huggingface-hub`` below what current transformers needs), and runs ``conformance run --impl
NAME`` in it -> ``reports/impls/NAME.{json,md}``.

``compare_impls``: reference and peft in the shared CPU environment, every ``IMPL_ENVS``
implementation from the main interpreter in its own environment (``--impl NAME@.nox/impl-NAME/bin/python``),
then ``conformance join`` of the reports -> ``reports/impls/comparison.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import envs
from .log import CIError, log
from .matrix import CPU_CONSTRAINTS, CPU_TORCH, ROOT
from .sessions import checkout_env, run

#: The LitGPT stack, measured by the LitGPT engineer: torch and bitsandbytes as in the main
#: environment, then LitGPT and its runtime dependencies without their declared dependencies
#: (litgpt 0.5.13 pins huggingface-hub<0.33 and more that the suite does not need).
LITGPT_PINS = ("litgpt==0.5.13", "lightning==2.6.6", "lightning-utilities==0.15.3", "torchmetrics==1.9.0",
               "tqdm==4.70.1", "pyyaml==6.0.4", "safetensors==0.8.0", "psutil==7.2.2")
#: AdapterHub's adapters 1.3.0 requires transformers~=4.57.6 (the main environment has transformers 5): the
#: newest 4.57 release; its own dependencies (huggingface-hub<1.0, tokenizers<=0.23) resolved by pip; accelerate
#: for transformers' bitsandbytes loading (the MODEL-* and TRAINER-* models: from_pretrained with device_map),
#: 1.12.0 as the PEFT axis pairs it with transformers 4.57.6. The suite itself goes in with --no-deps (no peft).
ADAPTERS_PINS = ("transformers==4.57.6", "adapters==1.3.0", "accelerate==1.12.0")
IMPL_ENVS: dict[str, envs.EnvSpec] = {
    "litgpt": envs.EnvSpec(
        "impl-litgpt", (f"torch=={CPU_TORCH}", "bitsandbytes==0.50.2"), (CPU_CONSTRAINTS,),
        then=(("--no-deps", *LITGPT_PINS), ("hypothesis", "pytest", "pytest-benchmark"), ("--no-deps", "-e", "."))),
    "adapters": envs.EnvSpec(
        "impl-adapters", (f"torch=={CPU_TORCH}", "bitsandbytes==0.50.2", *ADAPTERS_PINS), (CPU_CONSTRAINTS,),
        then=(("hypothesis", "pytest"), ("--no-deps", "-e", "."))),
}
#: what compare_impls runs in the shared CPU environment
MAIN_IMPLS = ("reference", "peft")
OUT = ROOT / "reports" / "impls"


def impl_env(name: str) -> envs.EnvSpec:
    try:
        return IMPL_ENVS[name]
    except KeyError:
        raise CIError(f"no environment for implementation {name!r}; known: {', '.join(IMPL_ENVS)}") from None


def _run_args(rest: list[str], report: Path) -> list[str]:
    return ["--report", str(report), "--markdown", str(report.with_suffix(".md")), *rest]


def impl(opts: argparse.Namespace, rest: list[str]) -> int:
    """Ensure ``.nox/impl-NAME`` and run the spec for NAME in it (other arguments go to ``conformance run``)."""
    python = envs.ensure(impl_env(opts.name), fresh=opts.fresh)
    if opts.plan:
        print(python)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    return run([python, "-m", "conformance", "run", "--impl", opts.name, *_run_args(rest, OUT / f"{opts.name}.json")])


def compare_impls(opts: argparse.Namespace, rest: list[str]) -> int:
    """Reference + peft here, each IMPL_ENVS implementation in its own environment, one joined table."""
    main = envs.ensure(envs.cpu_env(), fresh=opts.fresh)
    others = {name: envs.ensure(spec, fresh=opts.fresh) for name, spec in IMPL_ENVS.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    reports = [OUT / "main.json", *(OUT / f"{name}.json" for name in others)]
    status = 0
    rc = run([main, "-m", "conformance", "run", *(a for i in MAIN_IMPLS for a in ("--impl", i)),
              *_run_args(rest, reports[0])], env=checkout_env())
    status = max(status, rc)
    for (name, python), report in zip(others.items(), reports[1:]):
        rc = run([main, "-m", "conformance", "run", "--impl", f"{name}@{python}", *_run_args(rest, report)],
                 env=checkout_env())
        status = max(status, rc)
    missing = [str(r) for r in reports if not r.is_file()]
    if missing:
        raise CIError(f"no report from {', '.join(missing)} (see the run above)")
    out = OUT / "comparison"
    rc = run([main, "-m", "conformance", "join", *map(str, reports), "--json", f"{out}.json",
              "--markdown", f"{out}.md"], env=checkout_env())
    if rc:
        raise CIError(f"join failed (rc={rc})")
    log(f"comparison: {out}.md (and .json); the runs' status {status} (1: a MUST clause failed somewhere)")
    return 0 if status in (0, 1) else status
