#!/usr/bin/env python
"""LitGPT's QLoRA path as ``litgpt finetune_lora --quantize bnb.nf4-dq`` builds it: ``merge()`` is wrong there too.

torch + bitsandbytes + litgpt and its own dependency lightning (Fabric), no conformance import; needs CUDA
(Fabric's bnb layers quantize on the move to the GPU). ``litgpt/finetune/lora.py`` (0.5.13) passes
``BitsandbytesPrecision(quantize[4:], dtype)`` to ``Fabric`` and builds the model under
``fabric.init_module``, where ``torch.nn.Linear`` is Fabric's ``_NF4DQLinear`` / ``_Linear8bitLt``, so
``LoRALinear.linear`` is that layer. ``LoRALinear.merge()`` then leaves the 4-bit layer with a dense
weight and the stale quant state (see ``litgpt_merge_4bit_not_requantized.py``): on CUDA the merged
forward is silently wrong. ``int8-training`` is run as the control: Fabric's ``_Linear8bitLt`` keeps fp16
weights there (``has_fp16_weights=True``), so its merge is a dense fp16 add and matches.

Run: ``python litgpt_fabric_qlora_merge.py``. Exit 1 while either mode reproduces, 2 without CUDA.
"""

import math
import sys
import warnings
from importlib import metadata

import bitsandbytes as bnb
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision
from litgpt.lora import LoRALinear


def run(mode: str, dtype: torch.dtype) -> str | None:
    fabric = Fabric(devices=1, accelerator="cuda", plugins=BitsandbytesPrecision(mode, dtype))
    with fabric.init_module(empty_init=False):
        layer = LoRALinear(64, 48, r=4, lora_alpha=16, bias=True)
    layer = fabric.setup_module(layer)
    lin = layer.linear
    print(f"{mode}: linear is {type(lin).__name__}, weight {lin.weight.dtype} {tuple(lin.weight.shape)}, "
          f"lora_A {layer.lora_A.dtype} on {layer.lora_A.device}")
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(layer.module.lora_B, a=math.sqrt(5))  # a trained (non-zero) B
        x = torch.randn(3, 64, device="cuda", dtype=dtype)
        y = layer(x)
    try:
        layer.module.merge()
    except Exception as exc:  # noqa: BLE001 - the failure is what we report
        return f"{mode}: merge() raised {type(exc).__name__}: {exc}"
    w = layer.module.linear.weight
    with torch.no_grad():
        err = (layer(x).float() - y.float()).abs().max().item()
    print(f"{mode}: after merge weight {w.dtype} {tuple(w.shape)}, merged forward vs unmerged max |diff| {err:.3g}")
    if w.dtype != torch.uint8 and mode.startswith("nf4"):
        return f"{mode}: merged weight left dense {w.dtype} {tuple(w.shape)}; merged forward off by {err:.3g}"
    return None if err < 0.1 else f"{mode}: merged forward off by {err:.3g}"


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"litgpt {metadata.version('litgpt')}, lightning {metadata.version('lightning')}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    found = [p for p in (run("nf4-dq", torch.bfloat16), run("int8-training", torch.float16)) if p]
    for p in found:
        print("REPRODUCED:", p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
