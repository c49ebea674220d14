"""COMPILE-FORWARD and COMPILE-MERGE-CYCLE: adapter layers called through ``torch.compile``.

Every case starts from ``torch._dynamo.reset()`` (dynamo caches compiled code per code object, guarded on the
module: without the reset every new layer of the same class is a recompile, and past
``torch._dynamo.config.recompile_limit`` dynamo would run the forward eagerly) and compiles its layer once, with the
backend ``cases.backend_for(ctx.device)`` wrapped in ``counting.CountingBackend``: a compiled call that ran no
compiled graph fails. The oracles are the forward's (``numerics.layer_expected``, as FWD-ORACLE) and the merged
layer's (``merge.checks._merged_expected``, as MERGE-FORWARD-BOUND).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conformance import numerics
from conformance.clauses import cases
from conformance.clauses.clause import check
from conformance.clauses.compile.cases import INPUT_LEADS, backend_for, compile_cases, compile_known
from conformance.clauses.compile.counting import CountingBackend, graph_breaks
from conformance.clauses.merge.cases import merge_known
from conformance.clauses.merge.checks import _merged_expected, step
from conformance.quant.torchnames import dtype_name

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


def _compiled(ctx: CheckContext, layer: torch.nn.Module) -> tuple[torch.nn.Module, CountingBackend]:
    """``torch.compile(layer)`` with this device's backend, counted, from a fresh dynamo state. The compiled module
    wraps the implementation's layer: an exception out of calling it is the implementation's."""
    torch._dynamo.reset()
    counters.clear()
    counter = CountingBackend(backend_for(ctx.device))
    compiled = torch.compile(layer, backend=counter)
    ctx.impl_objects.append(compiled)
    return compiled, counter


def _call(ctx: CheckContext, compiled: torch.nn.Module, counter: CountingBackend, x: torch.Tensor,
          label: str) -> torch.Tensor:
    """One eval-mode, no-grad call of the compiled layer; it must run at least one compiled graph."""
    before, graphs_before = counter.runs, counter.graphs
    ctx.admit_input(getattr(compiled, "_orig_mod", compiled), x)
    with torch.no_grad():
        y = compiled(x)
    ctx.check(counter.runs > before, (
        f"{label}: the compiled layer ran eagerly: no compiled graph ran in this call (graphs captured so far "
        f"{counter.graphs}, {counter.graphs - graphs_before} in this call; dynamo runs a frame eagerly under "
        "torch.compiler.disable, when it captures nothing, or past torch._dynamo.config.recompile_limit)"))
    ctx.measure_max("graph_runs_per_call.max", float(counter.runs - before))
    return y


def _check_output(ctx: CheckContext, label: str, y: torch.Tensor, x: torch.Tensor, out_features: int) -> None:
    want = (*x.shape[:-1], out_features)
    ctx.check(tuple(y.shape) == want and y.dtype == x.dtype,
              f"{label}: output {tuple(y.shape)} {y.dtype}, expected {want} {x.dtype} (the input's dtype)")


def _measure_counts(ctx: CheckContext, counter: CountingBackend) -> None:
    ctx.measure("graphs_captured", int(ctx.measurements.get("graphs_captured", 0)) + counter.graphs)
    ctx.measure("graph_runs", int(ctx.measurements.get("graph_runs", 0)) + counter.runs)
    ctx.measure("graph_breaks", int(ctx.measurements.get("graph_breaks", 0)) + graph_breaks())
    ctx.measure("backend", counter.backend)


def _build(ctx: CheckContext, method: str, case: cases.BaseCase, params: dict[str, Any], i: int) -> torch.nn.Module:
    layer = ctx.make_layer(ctx.make_base(case, seed=ctx.seed + i), method, **params)
    cases.fill_adapter(layer, "default", ctx.generator(300 + i))
    layer.eval()
    return layer


@check("COMPILE-FORWARD")
def check_compiled_forward(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        for i, case in enumerate(compile_cases(ctx, bits)):
            lead = INPUT_LEADS[i % len(INPUT_LEADS)]
            label = f"compiled {acase.label} on {case.label}, input {(*lead, case.in_features)}"
            with ctx.case(label, known=compile_known(ctx, case)):
                layer = _build(ctx, method, case, acase.params, i)
                x = ctx.randn(*lead, case.in_features, dtype=case.compute_dtype, offset=i)
                if case.threshold:
                    x = cases.with_outliers(x, case.threshold)
                with torch.no_grad():
                    exp = numerics.layer_expected(layer, method, "default", acase.params, x)
                compiled, counter = _compiled(ctx, layer)
                try:
                    for call in ("first", "second"):
                        what = f"{label}, {call} compiled call"
                        y = _call(ctx, compiled, counter, x, what)
                        _check_output(ctx, what, y, x, case.out_features)
                        ctx.bounded(f"ratio.{method}.{bits}bit.{dtype_name(case.compute_dtype)}", exp.ratio(y),
                                    lambda: f"{what}: output outside the oracle bound {exp.describe(y)}")
                finally:
                    _measure_counts(ctx, counter)


@check("COMPILE-MERGE-CYCLE")
def check_compiled_merge_cycle(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        acase = cases.adapter_cases(method)[0]
        params = acase.params
        for i, case in enumerate(compile_cases(ctx, bits, merges=True)):
            lead = INPUT_LEADS[i % len(INPUT_LEADS)]
            label = f"compiled {acase.label} on {case.label}, input {(*lead, case.in_features)}"
            with ctx.case(label, known=merge_known(ctx, case)):
                layer = _build(ctx, method, case, params, i)
                x = ctx.randn(*lead, case.in_features, dtype=case.compute_dtype, offset=i)
                if case.threshold:
                    x = cases.with_outliers(x, case.threshold)
                compiled, counter = _compiled(ctx, layer)
                try:
                    with torch.no_grad():
                        exp = numerics.layer_expected(layer, method, "default", params, x)
                    y = _call(ctx, compiled, counter, x, f"{label}, before merge")
                    _check_output(ctx, f"{label}, before merge", y, x, case.out_features)
                    ctx.bounded("ratio.before_merge", exp.ratio(y),
                                lambda: f"{label}, before merge: output outside the oracle bound {exp.describe(y)}")

                    with torch.no_grad():
                        w0, b0 = numerics.base_weights(layer.base_layer)
                        step(ctx, layer, "merge", f"{label}, merge")
                        ctx.check(bool(layer.merged), f"{label}: merged is False after merge()")
                        exp_m, _ = _merged_expected(layer, method, "default", params, x, w0, b0)
                    y_m = _call(ctx, compiled, counter, x, f"{label}, merged")
                    _check_output(ctx, f"{label}, merged", y_m, x, case.out_features)
                    ctx.bounded("ratio.merged", exp_m.ratio(y_m), lambda: (
                        f"{label}: the compiled forward after merge() is outside the bound of one requantization of "
                        f"the merge target {exp_m.describe(y_m)}"))

                    with torch.no_grad():
                        step(ctx, layer, "unmerge", f"{label}, unmerge")
                        ctx.check(not layer.merged, f"{label}: merged is True after unmerge()")
                        exp_u = numerics.layer_expected(layer, method, "default", params, x)
                    y_u = _call(ctx, compiled, counter, x, f"{label}, unmerged")
                    _check_output(ctx, f"{label}, unmerged", y_u, x, case.out_features)
                    ctx.bounded("ratio.unmerged", exp_u.ratio(y_u), lambda: (
                        f"{label}: the compiled forward after unmerge() is outside the oracle bound of the layer as "
                        f"it is {exp_u.describe(y_u)}"))
                finally:
                    _measure_counts(ctx, counter)
