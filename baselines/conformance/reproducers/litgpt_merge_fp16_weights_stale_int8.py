#!/usr/bin/env python
"""LitGPT: ``LoRALinear.merge()`` into an 8-bit base with float16 weights leaves bitsandbytes' cached int8 weight
behind: after an eval-mode forward, the merged layer still computes with the unmerged weight (the adapter is lost).

Plain torch + bitsandbytes + litgpt, no conformance import. Found by ``MERGE-FORWARD-BOUND`` on the 8-bit bases with
``has_fp16_weights=True`` (``--impl litgpt``). That base is Lightning Fabric's ``BitsandbytesPrecision("int8-training")``
layer (``_Linear8bitLt``, bitsandbytes' default ``has_fp16_weights=True``), i.e. LitGPT's
``finetune_lora --quantize bnb.int8-training``. bitsandbytes 0.50.2 (``autograd/_functions.py`` ``MatMul8bitLt`` /
``MatMul8bitFp``) quantizes the float16 weight into ``layer.state.CB``/``SCB`` and, in eval mode, reuses them for as
long as ``state.CB`` is set; only a training-mode forward or ``state.reset_grads()`` makes it quantize again.
``litgpt/lora.py`` (0.5.13) ``LoRALinear.merge`` takes the dense branch for this weight,
``self.linear.weight.data += lora_data`` (the float16 weight is merged correctly), but does not reset that state: the
next eval-mode forward multiplies by the int8 weight of *before* the merge, and ``merged=True`` switches the LoRA path
off. Validation (eval mode) before a merge, then generation (eval mode) is exactly that order.

Run: ``python litgpt_merge_fp16_weights_stale_int8.py [cpu|cuda]`` (default: cuda when available).
Exit 1 while it reproduces (the merged eval forward is the unmerged base's, not the merged weight's), 0 otherwise.
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
    base = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=True, threshold=0.0)
    base.weight = bnb.nn.Int8Params((torch.randn(48, 64) / 8).half(), requires_grad=False, has_fp16_weights=True)
    base = base.to(device)  # has_fp16_weights: stays float16
    layer = LoRALinear(64, 48, r=4, lora_alpha=16).to(device)
    layer.linear = base  # where Lightning Fabric's BitsandbytesPrecision puts its bnb layer in LitGPT's LoRA
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))  # a trained (non-zero) B
    layer.eval()
    x = torch.randn(3, 64, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    with torch.no_grad():
        y_unmerged = layer(x)         # caches the int8 form of the float16 weight in base.state.CB/SCB
        y_base = base(x)              # the base alone
        layer.merge()
        y_merged = layer(x)           # eval mode again
        base.state.reset_grads()      # what a merge has to do: drop the cached int8 weight
        y_fresh = layer(x)            # the same merged layer, quantized from its merged float16 weight
    stale = (y_merged - y_base).abs().max().item()
    lost = (y_merged - y_unmerged).abs().max().item()
    fresh = (y_fresh - y_unmerged).abs().max().item()
    print(f"merged eval forward vs the base alone: max |diff| {stale:.3g}; vs the unmerged layer: {lost:.3g}; "
          f"after state.reset_grads(): vs the unmerged layer {fresh:.3g}")
    if stale == 0.0 and lost > 10 * fresh:
        print("REPRODUCED: after merge() the eval forward multiplies by the int8 weight cached before the merge "
              "(the adapter's contribution is gone)")
        return 1
    print("not reproduced: the merged eval forward uses the merged weight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
