"""Probe: is the defensive ``result = result.clone()`` before adding the adapter output still needed?

PEFT (``peft/tuners/lora/bnb.py``, the 4-bit forward): "As per Tim Dettmers, for 4bit, we need to defensively clone
here. The reason is that in some cases, an error can occur that backprop does not work on a
manipulated view. This issue may be solved with newer PyTorch versions but this would need extensive
testing to be sure." This is that testing. For every case of the backprop matrix (bits / quant type,
compute dtype, input rank, batch, input requiring grad, grad / no_grad / inference_mode, single or
mixed batch) and every way of adding a LoRA output *in place* onto the RAW output of the bitsandbytes
layer, it runs the uncloned and the cloned path and classifies each as

* ``raises``: the in-place update or the backward raised (type and message recorded);
* ``wrong``: output or a gradient (input, lora_A, lora_B) is outside the float64 bound of
  ``conformance.numerics.grad_expected`` (same oracle and bound as clause BACKPROP-GRAD-F64);
* ``works``.

The verdict names the cases where the uncloned path fails and cloning fixes it ("clone still
required for: ..."), or says that none does on this torch/bitsandbytes. ``--compare baseline.json``
shows what changed per case since a baseline (exit 1 when a case went from works to raises/wrong);
a maintainer runs it on each new PyTorch release.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from conformance import numerics
from conformance.clauses.cases import (
    BASE,
    GRAD_BATCH_SIZES,
    GRAD_DTYPES,
    GRAD_IN_FEATURES,
    GRAD_INPUT_RANKS,
    GRAD_OUT_FEATURES,
    AdapterCase,
    BaseCase,
    OnBase,
    grad_base,
    grad_input_shape,
    quants_for,
)
from conformance.probe.options import add_arguments  # noqa: F401  (re-exported: the probe's options)
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import GRAD_MODES, dtype_of, grad_mode

from .clone_report import compare, dumps, table, verdict

SCHEMA_VERSION = 1
RANK, ALPHA = 4, 8.0
#: the LoRA adapter every case adds (its A and B are seeded in ``_adapters``)
ADAPTER = AdapterCase("lora", {"r": RANK, "lora_alpha": ALPHA})
MIXED_NAMES = ("a", BASE, "b")
MODES = tuple(GRAD_MODES)
SINGLE_TECHNIQUES = ("iadd", "add_", "view_add_", "mul1_add_", "addmm_")
MIXED_TECHNIQUES = ("index_add_", "setitem_iadd")
TECHNIQUE_CODE = {
    "iadd": "result += delta",
    "add_": "result.add_(delta)",
    "view_add_": "result.view(-1, out).add_(delta.view(-1, out))",
    "mul1_add_": "result.mul_(1); result.add_(delta)",
    "addmm_": "result.view(-1, out).addmm_(x A^T, B^T, alpha=scaling)",
    "index_add_": "result.index_add_(0, rows, delta_rows) per adapter",
    "setitem_iadd": "result[rows] += delta_rows per adapter (PEFT _mixed_batch_forward)",
}

#: (base case, device) -> (the layer, its dequantized weight, its bias)
BaseFactory = Callable[[BaseCase, str], tuple[nn.Module, torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class ProbeCase(OnBase):
    """One probe case: the base (a backprop-matrix base, ``cases.grad_base``), the input layout, the grad mode,
    single or mixed batch, and the in-place technique. Its JSON keys (:meth:`to_json`) are the factors."""

    base: BaseCase
    rank: int
    batch: int
    x_requires_grad: bool
    mode: str
    batch_kind: str  # single / mixed
    technique: str

    @property
    def id(self) -> str:
        g = "xgrad" if self.x_requires_grad else "xnograd"
        return (f"{self.quant}/{self.dtype}/rank{self.rank}-batch{self.batch}/{g}/{self.mode}/"
                f"{self.batch_kind}/{self.technique}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.base.compute_dtype

    def input_shape(self) -> tuple[int, ...]:
        return grad_input_shape(self.rank, self.batch)

    def to_json(self) -> dict[str, Any]:
        """The factors, flat (the keys of every stored probe report: bits, quant, dtype, rank, ...)."""
        return {"bits": self.bits, "quant": self.quant, "dtype": self.dtype, "rank": self.rank, "batch": self.batch,
                "x_requires_grad": self.x_requires_grad, "mode": self.mode, "batch_kind": self.batch_kind,
                "technique": self.technique}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProbeCase:
        """The case of a stored record (:meth:`to_json`'s keys)."""
        base = grad_base(d["bits"], d["quant"], dtype_of(d["dtype"]))
        return cls(base, d["rank"], d["batch"], d["x_requires_grad"], d["mode"], d["batch_kind"], d["technique"])


def matrix(bits: Iterable[int] = (4, 8)) -> list[ProbeCase]:
    """The full cross product (the probe is a measurement: no sampling)."""
    out = []
    for (b, qt), dt, mode, xg in itertools.product(quants_for(list(bits)), GRAD_DTYPES, MODES, (True, False)):
        base = grad_base(b, qt, dt)
        for rank in GRAD_INPUT_RANKS:
            for batch in (GRAD_BATCH_SIZES if rank > 1 else (1,)):
                out += [ProbeCase(base, rank, batch, xg, mode, "single", t) for t in SINGLE_TECHNIQUES]
            if rank > 1:
                out += [ProbeCase(base, rank, len(MIXED_NAMES), xg, mode, "mixed", t) for t in MIXED_TECHNIQUES]
    return out


def default_base(case: BaseCase, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """A bitsandbytes base layer, its dequantized weight and its bias (read before any forward)."""
    base = case.build(device)
    bias = None if base.bias is None else base.bias.detach().double().cpu().clone()
    return base, qlayers.dequantize(base).double().cpu(), bias


# --------------------------------------------------------------------------------------------------
def _adapters(device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for name in ("a", "b"):
        a = torch.randn(RANK, GRAD_IN_FEATURES, generator=gen) / GRAD_IN_FEATURES**0.5
        b = torch.randn(GRAD_OUT_FEATURES, RANK, generator=gen) / RANK**0.5
        out[name] = (a.to(device), b.to(device))
    return out


def _apply(technique: str, result: torch.Tensor, x: torch.Tensor, ad: dict[str, tuple[torch.Tensor, torch.Tensor]],
           scaling: float) -> torch.Tensor:
    """Add the LoRA output of adapter 'a' (single) or 'a'/'b' per row (mixed) onto ``result`` in place."""
    out = result.shape[-1]

    def delta(name: str, xs: torch.Tensor) -> torch.Tensor:
        a, b = ad[name]
        return ((xs.to(a.dtype) @ a.t()) @ b.t() * scaling).to(result.dtype)

    if technique == "iadd":
        result += delta("a", x)
    elif technique == "add_":
        result.add_(delta("a", x))
    elif technique == "view_add_":
        result.view(-1, out).add_(delta("a", x).reshape(-1, out))
    elif technique == "mul1_add_":
        result.mul_(1)
        result.add_(delta("a", x))
    elif technique == "addmm_":
        a, b = ad["a"]
        h = (x.to(a.dtype) @ a.t()).to(result.dtype).reshape(-1, a.shape[0])
        result.view(-1, out).addmm_(h, b.t().to(result.dtype), alpha=scaling)
    elif technique in MIXED_TECHNIQUES:
        for name in ("a", "b"):
            rows = [i for i, n in enumerate(MIXED_NAMES) if n == name]
            idx = torch.tensor(rows, device=x.device)
            d = delta(name, x.index_select(0, idx))
            if technique == "index_add_":
                result.index_add_(0, idx, d)
            else:
                result[rows] += d
    else:
        raise ValueError(f"unknown technique {technique!r}; known: {sorted(TECHNIQUE_CODE)}")
    return result


def _short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _run_path(case: ProbeCase, clone: bool, base: nn.Module, x0: torch.Tensor, g: torch.Tensor,
              ad: dict[str, tuple[torch.Tensor, torch.Tensor]], exp: numerics.GradExpected) -> dict[str, Any]:
    """One path (cloned or not): outcome, where it raised, worst ratio to the bound, the output."""
    params = {n: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for n, (a, b) in ad.items()}
    x = x0.clone().requires_grad_(case.x_requires_grad)
    phase = "base forward"
    rec: dict[str, Any] = {"outcome": "works"}
    try:
        with grad_mode(case.mode):
            result = base(x)
            rec["raw_is_view"] = bool(result._is_view())
            rec["raw_grad_fn"] = type(result.grad_fn).__name__ if result.grad_fn is not None else None
            if clone:
                result = result.clone()
            phase = "in-place update"
            result = _apply(case.technique, result, x, params, numerics.lora_scaling(ADAPTER.params))
            if case.mode == "grad":
                phase = "backward"
                (result * g).sum().backward()
    except Exception as exc:  # noqa: BLE001  (what torch raises is the measurement)
        rec.update(outcome="raises", phase=phase, error_type=type(exc).__name__, error=_short(exc))
        return rec
    checks = [("output", result, exp.y, exp.y_bound)]
    if case.mode == "grad":
        if case.x_requires_grad:
            checks.append(("grad x", x.grad, exp.grads["x"], exp.grad_bounds["x"]))
        for n, (a, b) in params.items():
            if case.batch_kind == "single" and n != "a":
                continue
            checks.append((f"grad {n}.lora_A", a.grad, exp.grads[f"{n}:lora_A.weight"],
                           exp.grad_bounds[f"{n}:lora_A.weight"]))
            checks.append((f"grad {n}.lora_B", b.grad, exp.grads[f"{n}:lora_B.weight"],
                           exp.grad_bounds[f"{n}:lora_B.weight"]))
    worst, bad = 0.0, []
    for what, got, e, bnd in checks:
        if got is None:
            worst, bad = math.inf, bad + [f"{what} is None"]
            continue
        ratio, where = numerics.compare(got.detach().cpu(), e, bnd)
        worst = max(worst, ratio)
        if ratio > 1:
            bad.append(f"{what}: ratio {ratio:.3g} ({where})")
    rec["max_ratio"] = worst if math.isfinite(worst) else "inf"
    if bad:
        rec.update(outcome="wrong", error="; ".join(bad)[:500])
    rec["_tensors"] = [t.detach().cpu().clone() if t is not None else None for _, t, _, _ in checks]
    return rec


def run_probe(device: str = "cpu", *, cases: Sequence[ProbeCase] | None = None,
              base_factory: BaseFactory | None = None, progress: TextIO | None = None) -> dict[str, Any]:
    """Run every case, return the JSON-able report (schema_version, environment, cases, verdict)."""
    cases = list(cases if cases is not None else matrix())
    if base_factory is None:
        # one bitsandbytes layer per (bits, quant, dtype): the in-place updates touch only its output
        cache: dict[tuple[BaseCase, str], tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}

        def factory(base: BaseCase, dev: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
            if (base, dev) not in cache:
                cache[base, dev] = default_base(base, dev)
            return cache[base, dev]
    else:
        factory = base_factory
    ad = _adapters(device)
    gen = torch.Generator().manual_seed(0)
    expected_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, numerics.GradExpected]] = {}
    records = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        if progress is not None and (i % 50 == 0 or i == len(cases) - 1):
            print(f"[clone probe] {i + 1}/{len(cases)} {case.id} ({time.perf_counter() - start:.1f}s)",
                  file=progress, flush=True)
        base, w, bias = factory(case.base, device)
        key = (case.base, case.rank, case.batch, case.x_requires_grad, case.batch_kind)
        if key not in expected_cache:
            x0 = torch.randn(*case.input_shape(), generator=gen).to(device=device, dtype=case.torch_dtype)
            g = torch.randn(*x0.shape[:-1], GRAD_OUT_FEATURES, generator=gen).to(device=device, dtype=case.torch_dtype)
            names = list(MIXED_NAMES) if case.batch_kind == "mixed" else None
            used = ("a", "b") if names else ("a",)
            state = numerics.LayerState(
                w, bias, ADAPTER.method, {n: dict(ADAPTER.params) for n in used},
                {n: {"lora_A.weight": ad[n][0].double().cpu(), "lora_B.weight": ad[n][1].double().cpu()} for n in used},
                int8_input=case.bits == 8 and str(device).startswith("cuda"),
            )
            exp = numerics.grad_expected(state, x0.cpu(), g.cpu(), compute_dtype=case.torch_dtype, names=names, active=["a"])
            expected_cache[key] = (x0, g, exp)
        x0, g, exp = expected_cache[key]
        unc = _run_path(case, False, base, x0, g, ad, exp)
        base, _, _ = factory(case.base, device)
        clo = _run_path(case, True, base, x0, g, ad, exp)
        ut, ct = unc.pop("_tensors", None), clo.pop("_tensors", None)
        if ut is not None and ct is not None:
            unc["bitwise_equal_to_cloned"] = all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(ut, ct))
        records.append({
            "id": case.id, **case.to_json(),
            "uncloned": unc, "cloned": clo,
            "clone_required": unc["outcome"] != "works" and clo["outcome"] == "works",
            "both_fail": unc["outcome"] != "works" and clo["outcome"] != "works",
        })
    elapsed = time.perf_counter() - start
    return {
        "schema_version": SCHEMA_VERSION,
        "environment": environment(device),
        "probe": {"name": "clone", "seconds": round(elapsed, 2), "rank": RANK, "lora_alpha": ALPHA,
                  "shape": [GRAD_IN_FEATURES, GRAD_OUT_FEATURES], "techniques": TECHNIQUE_CODE},
        "cases": records,
        "verdict": verdict(records, environment(device)),
    }


def environment(device: str) -> dict[str, Any]:
    from conformance.harness.environment import fingerprint

    return fingerprint(device)


# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("clone probe: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    baseline = None
    if getattr(args, "compare", None):
        try:
            baseline = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            print(f"clone probe: cannot read baseline {args.compare}: {exc}", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    if getattr(args, "threads", 1) > 0:
        torch.set_num_threads(args.threads)
    try:
        report = run_probe(args.device, cases=matrix(args.bits or (4, 8)), progress=sys.stderr)
    except Exception:  # pragma: no cover - a crash of the probe itself, not a finding
        traceback.print_exc()
        return 2
    finally:
        torch.set_num_threads(threads)
    if not getattr(args, "quiet", False):
        print(table(report["cases"]))
    print(report["verdict"]["line"])
    print(f"({len(report['cases'])} cases in {report['probe']['seconds']}s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from conformance.harness.files import write_atomic

        write_atomic(args.json, dumps(report))
    if baseline is not None:
        lines, regressed = compare(report, baseline)
        print(f"compared with {args.compare}: {len(lines)} change(s)")
        for line in lines:
            print("  " + line)
        return 1 if regressed else 0
    return 0
