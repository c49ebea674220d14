"""LitGPT in the layer benchmarks: a CPU smoke of the ``litgpt`` builder (``conformance.bench.layers``).

Skipped where litgpt does not import (the project's own venv; LitGPT runs in a venv of its own, see
``conformance.impls.litgpt``). Every quick-matrix LoRA forward and forward+backward case runs with
LitGPT's ``LoRALinear`` timed directly, and its output matches the reference layer holding the same
``A``/``B`` over the same base (both compute ``base(x) + scaling * x A^T B^T`` in fp32 here).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("litgpt.lora", reason="litgpt is not installed (it lives in its own venv: "
                    "see conformance/impls/litgpt.py for the install line)")

from conformance.bench.cases import matrix  # noqa: E402
from conformance.bench.layers import Builder, make_adapter_layer  # noqa: E402

CASES = [c.with_impl("litgpt") for c in matrix("cpu", quick=True)
         if c.impl == "reference" and c.method == "lora" and c.op in ("fwd", "fwdbwd")]


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_litgpt_smoke(benchmark, case) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    builder = Builder("cpu")
    prep = builder.prepare(case)

    def timed() -> torch.Tensor:
        if prep.setup:
            prep.setup()
        return prep.fn()

    out = benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out.float()).all(), "LitGPT benchmark output has NaN/Inf"
    layer = builder.layer(case)
    assert type(layer).__module__ == "litgpt.lora", f"timed {type(layer)}, not LitGPT's LoRALinear"
    ref = make_adapter_layer(case.with_impl("reference"), builder.base(case))
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(layer.lora_A)
        ref.lora_B["default"].weight.copy_(layer.lora_B)
        x = torch.randn(case.tokens, case.in_features, generator=torch.Generator().manual_seed(5),
                        dtype=out.dtype)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)


def test_litgpt_merge_not_benchmarked() -> None:
    case = next(c for c in matrix("cpu", quick=True) if c.method == "lora" and c.op == "merge").with_impl("litgpt")
    with pytest.raises(ValueError, match="no unmerge"):
        Builder("cpu").prepare(case)
