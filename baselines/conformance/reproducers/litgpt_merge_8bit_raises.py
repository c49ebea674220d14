#!/usr/bin/env python
"""LitGPT: ``LoRALinear.merge()`` on a bitsandbytes 8-bit base raises a dtype error instead of merging.

Plain torch + bitsandbytes + litgpt, no conformance import. Found by ``SAFE-UNSAFE-WARNS`` and the
merge clauses (``--impl litgpt``). The base is an int8-stored ``Linear8bitLt`` (``has_fp16_weights=False``):
Lightning Fabric's ``BitsandbytesPrecision("int8")`` (``_Int8LinearInference``), i.e. LitGPT's
``--quantize bnb.int8`` of generate/chat/serve and ``LLM.load``. ``litgpt/lora.py`` (0.5.13)
``LoRALinear.merge`` only special-cases ``torch.uint8`` (4-bit) weights; an int8 weight takes the dense
branch ``self.linear.weight.data += lora_data``, an in-place add of a float tensor into int8:
``RuntimeError: result type Float can't be cast to the desired output type Char``. The error does not
say that merging into int8 layers is unsupported; the layer is left intact. (finetune_lora's
``bnb.int8-training`` keeps fp16 weights, ``has_fp16_weights=True``, where merge is a plain fp16 add and
works: ``litgpt_fabric_qlora_merge.py``.)

Run: ``python litgpt_merge_8bit_raises.py [cpu|cuda]`` (default: cuda when available).
Exit 1 while it reproduces (merge raises, or the merged forward is wrong), 0 when it merges.
"""

import math
import sys
from importlib import metadata

import bitsandbytes as bnb
import torch
from litgpt.lora import LoRALinear


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"litgpt {metadata.version('litgpt')}, bitsandbytes {bnb.__version__}, torch {torch.__version__}, {device}")
    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=0.0).to(device)  # quantizes
    layer = LoRALinear(64, 48, r=4, lora_alpha=16).to(device)
    layer.linear = base  # where Lightning Fabric's BitsandbytesPrecision puts its bnb layer in LitGPT's QLoRA
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))  # a trained (non-zero) B
    x = torch.randn(3, 64, device=device, dtype=torch.float32)
    with torch.no_grad():
        y_unmerged = layer(x)
    before = base.weight.data.clone()
    try:
        layer.merge()
    except Exception as exc:  # noqa: BLE001 - the failure is what we report
        intact = torch.equal(layer.linear.weight.data, before)
        print(f"REPRODUCED: merge() raised {type(exc).__name__}: {exc}")
        print(f"merged={layer.merged}, int8 weight unchanged: {intact}")
        return 1
    with torch.no_grad():
        err = (layer(x) - y_unmerged).abs().max().item()
    print(f"merge() returned; merged forward vs unmerged: max |diff| {err:.3g}")
    if not err < 0.1:
        print("REPRODUCED: merged forward does not match the unmerged one")
        return 1
    print("not reproduced: the 8-bit merge works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
