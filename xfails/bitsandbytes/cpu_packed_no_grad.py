"""bitsandbytes 0.50.x, CPU with AVX512-BF16: after an eval-mode no-grad forward has repacked a Linear4bit for the
CPU, a train-mode forward without a bias runs ``bitsandbytes::gemv_4bit``, which has no autograd kernel: the output
says it requires grad, but backward gives its input no gradient (torch warns "an autograd kernel was not registered
... silently incorrect behavior"). In a model, every adapter upstream of such a layer stops learning: the QLoRA
pattern "evaluate during training, then train on". The same layer never repacked gives the input its gradient.

Run: python xfails/bitsandbytes/cpu_packed_no_grad.py   (exit 1: reproduced, 0: fixed, 2: not this CPU)
Uses bitsandbytes and torch only."""

import sys
import warnings

import bitsandbytes as bnb
import torch

if not bnb.functional.has_avx512bf16():
    print("not reproducible here: bitsandbytes reports no AVX512-BF16 on this CPU (the packed layout is off)")
    sys.exit(2)
warnings.simplefilter("ignore")
print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}")


def layer() -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    out = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    out.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4", module=out)
    return out.to("cpu")


def input_grad(repacked: bool) -> torch.Tensor | None:
    lin = layer()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    if repacked:
        lin.eval()
        with torch.no_grad():
            lin(x)  # repacks: quant_state.packing_format_for_cpu is now True
    lin.train()
    xi = x.clone().requires_grad_(True)
    lin(xi).sum().backward()
    return xi.grad


fresh, packed = input_grad(False), input_grad(True)
print(f"never repacked: input grad norm {float(fresh.norm()):.4g}")
print(f"after an eval no-grad forward (repacked): input grad {'None' if packed is None else f'norm {float(packed.norm()):.4g}'}")
if packed is None or not torch.allclose(packed, fresh, rtol=0.05, atol=1e-3):
    print("DEFECT the repacked layer's train-mode forward gives its input no (or another) gradient")
    sys.exit(1)
sys.exit(0)
