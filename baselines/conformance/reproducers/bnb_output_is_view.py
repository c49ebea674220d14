#!/usr/bin/env python
"""Is the raw output of a bitsandbytes layer a view? The question behind "is the defensive clone still needed?".

Plain torch + bitsandbytes, no conformance import. PEFT's 4-bit LoRA forward clones the base layer's output before
adding the adapter's in place (``peft v0.21.2 src/peft/tuners/lora/bnb.py``, ``Linear4bit.forward``: "As per Tim
Dettmers, for 4bit, we need to defensively clone here"). The in-place add raises ("Output 0 of MatMul4Bit is a view
and is being modified inplace ... created inside a custom Function") exactly when the output autograd records is a
view made inside bitsandbytes' ``torch.autograd.Function`` (``MatMul4Bit``, ``MatMul8bitFp``): the clone probe
(``python -m conformance probe clone``) counts the cases; this script asks the tensor itself, for every base and
input layout the probe's "clone required" cases differ in, and prints one JSON object:

- ``is_view``: ``out._is_view()``; ``base``: ``out._base is not None``; ``grad_fn``: ``type(out.grad_fn).__name__``;
- ``torch_alone``: the same for ``torch.nn.functional.linear`` with and without a bias on a plain weight (no
  bitsandbytes), which is what bitsandbytes' CPU forward calls;
- ``inplace``: what ``out += delta`` does, ``delta`` an output that needs grad as an adapter's does (``works``, or the
  exception's first line).

Run on a CPU: ``python bnb_output_is_view.py [--json out.json]``; the same script under each torch answers whether a
change of verdict comes from torch or from bitsandbytes (the pins printed at the top). Exit 0 always: it measures.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys

import bitsandbytes as bnb
import torch

#: the probe's bases (``conformance.clauses.cases.grad_base``, ``conformance.quant.layers.make_base_layer``): 64 -> 48
#: with a frozen bias, blocksize 64, no double quant, 8-bit threshold 0, the weight from float16 for 8-bit. The bias
#: matters: with it, the layer's output for a 1-D or 3-D input comes back as a view of a 2-D result.
IN, OUT = 64, 48
#: (bits, quant type) of the probe's bases
BASES = ((4, "nf4"), (4, "fp4"), (8, "int8"))
#: input shapes: rank 1, 2 and 3 (the probe's rank1-batch1, rank2-batch3, rank3-batch3)
SHAPES = ((IN,), (3, IN), (3, 2, IN))
MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def layer(bits: int, quant: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if bits == 4:
        m = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=dtype, quant_type=quant)
        m.weight = bnb.nn.Params4bit(torch.randn(OUT, IN, dtype=dtype) * 0.1, requires_grad=False, quant_type=quant)
    else:
        m = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False, threshold=0.0)
        m.weight = bnb.nn.Int8Params((torch.randn(OUT, IN) * 0.1).to(torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
    m.bias = torch.nn.Parameter(torch.randn(OUT, dtype=dtype) * 0.1, requires_grad=False)  # frozen: an adapter's base
    return m.to("cpu")  # quantizes on the CPU


def measure(m: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype, x_grad: bool, mode: str) -> dict:
    x = torch.randn(*shape, dtype=dtype, requires_grad=x_grad)
    with MODES[mode]():
        out = m(x)
        row = {"is_view": out._is_view(), "base": out._base is not None,
               "grad_fn": type(out.grad_fn).__name__ if out.grad_fn is not None else None}
        delta = torch.ones(out.shape, dtype=out.dtype, requires_grad=True) * 1  # an adapter's output: needs grad
        try:
            out += delta
            row["inplace"] = "works"
        except RuntimeError as exc:
            row["inplace"] = str(exc).splitlines()[0][:120]
    return row


def torch_alone() -> list[dict]:
    """The same question of ``torch.nn.functional.linear`` with a bias on a plain float weight (no bitsandbytes):
    bitsandbytes' CPU forward returns what it returns, so a change here is torch's."""
    torch.manual_seed(0)
    w, b = torch.randn(OUT, IN), torch.randn(OUT)
    out = []
    for shape in SHAPES:
        for bias in (True, False):
            y = torch.nn.functional.linear(torch.randn(*shape), w, b if bias else None)
            out.append({"rank": len(shape), "bias": bias, "is_view": y._is_view(), "base": y._base is not None})
    return out


def main() -> int:
    dtype = torch.float32
    doc = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "bitsandbytes": bnb.__version__,
           "python": platform.python_version(), "device": "cpu", "dtype": str(dtype), "cases": []}
    for bits, quant in BASES:
        m = layer(bits, quant, dtype)
        for shape in SHAPES:
            for x_grad in (True, False):
                for mode in MODES:
                    doc["cases"].append({"quant": quant, "rank": len(shape), "shape": list(shape),
                                         "x_requires_grad": x_grad, "mode": mode,
                                         **measure(m, shape, dtype, x_grad, mode)})
    doc["torch_alone"] = torch_alone()
    views = [c for c in doc["cases"] if c["is_view"]]
    doc["summary"] = {"cases": len(doc["cases"]), "views": len(views), "base_set": sum(c["base"] for c in doc["cases"]),
                      "inplace_raises": sum(c["inplace"] != "works" for c in doc["cases"]),
                      "view_cases": sorted({f"{c['quant']} rank{c['rank']} x_requires_grad={c['x_requires_grad']} "
                                            f"{c['mode']}" for c in views})}
    text = json.dumps(doc, indent=1)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(f"torch {doc['torch']} (CUDA build: {doc['torch_cuda']}), bitsandbytes {doc['bitsandbytes']}, on the CPU")
    s = doc["summary"]
    print(f"{s['views']} of {s['cases']} raw outputs are views (_base set: {s['base_set']}); "
          f"`out += delta` raises for {s['inplace_raises']}")
    for v in s["view_cases"]:
        print("  view:", v)
    for c in doc["torch_alone"]:
        print(f"  torch alone: F.linear(rank-{c['rank']} input, bias={c['bias']}) is a view: {c['is_view']}")
    for c in doc["cases"]:
        if c["inplace"] != "works":
            print(f"  raises: {c['quant']} rank{c['rank']} x_requires_grad={c['x_requires_grad']} {c['mode']}: "
                  f"{c['inplace']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
