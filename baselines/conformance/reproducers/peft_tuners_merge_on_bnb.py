#!/usr/bin/env python
"""PEFT's PVeRA, RandLoRA and RoAd on bitsandbytes layers: merge()/unmerge() crash or break the base.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the TWIN-* clauses (each method on a bitsandbytes
base against its dense twin; ``python -m conformance run --impl peft --clauses 'TWIN-*'``).

The model is built as users get it: ``get_peft_model`` on a model that transformers marks ``is_loaded_in_4bit`` /
``is_loaded_in_8bit`` (what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` sets), so PEFT's
dispatchers pick their bitsandbytes classes (``peft/tuners/<method>/bnb.py``). One non-square layer (64 in, 48 out)
a trained-like adapter (every trainable tensor moved off its initial value) and one forward before the merge. What happens (PEFT 0.21.2,
bitsandbytes 0.50.2, torch 2.13 CPU):

- PVeRA, 4-bit: ``merge()`` writes the merged weight back as a dense float32 tensor into the ``Params4bit`` (the base
  is no longer 4-bit: its weight is (48, 64) float32 while ``quant_state`` is still set), and ``unmerge()`` then
  raises in bitsandbytes.
- RandLoRA, 4-bit and 8-bit: ``merge()`` raises in ``get_delta_weight`` (``mat1 and mat2 shapes cannot be
  multiplied``): the bnb classes build the delta for a square layer only.
- RoAd, 4-bit with a bfloat16 compute dtype, after a forward (bitsandbytes then holds the bias in bfloat16):
  ``unmerge()`` raises (``addmv input tensors must have the same dtype``).

Run: ``python peft_tuners_merge_on_bnb.py``. Exit 1 when any of them reproduces, 0 when every merge and unmerge runs
and leaves a 4-bit/8-bit base.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from torch import nn


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module, bits: int) -> None:
        super().__init__()
        self.lin = base
        setattr(self, f"is_loaded_in_{bits}bit", True)  # what transformers' bnb quantizers set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def base(bits: int, compute_dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 48, compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def run(name: str, config: peft.PeftConfig, bits: int, compute_dtype: torch.dtype = torch.float32) -> str | None:
    model = OneLayer(base(bits, compute_dtype), bits)
    peft.get_peft_model(model, config)
    layer = model.lin
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        layer(torch.randn(3, 64, dtype=compute_dtype))  # a forward first, as after training (bnb casts the bias)
    try:
        layer.merge()
    except Exception as e:  # noqa: BLE001 - the defect is any exception here
        return f"merge() raised {type(e).__name__}: {e}"
    w = layer.get_base_layer().weight
    if bits == 4 and w.dtype != torch.uint8:
        return f"after merge() the 4-bit base holds a {w.dtype} {tuple(w.shape)} weight"
    try:
        layer.unmerge()
    except Exception as e:  # noqa: BLE001
        return f"unmerge() raised {type(e).__name__}: {e}"
    return None


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    cases = [
        ("PVeRA 4-bit", peft.PveraConfig(r=4, target_modules=["lin"]), 4, torch.float32),
        ("RandLoRA 4-bit", peft.RandLoraConfig(r=4, target_modules=["lin"]), 4, torch.float32),
        ("RandLoRA 8-bit", peft.RandLoraConfig(r=4, target_modules=["lin"]), 8, torch.float32),
        ("RoAd 4-bit bf16", peft.RoadConfig(group_size=8, target_modules=["lin"]), 4, torch.bfloat16),
        ("VeRA 4-bit (control)", peft.VeraConfig(r=8, target_modules=["lin"]), 4, torch.float32),
    ]
    defect = False
    for name, config, bits, dtype in cases:
        what = run(name, config, bits, dtype)
        print(f"{name}: {'ok' if what is None else what}")
        defect |= what is not None and "control" not in name
    print("DEFECT: PEFT merge/unmerge of PVeRA/RandLoRA/RoAd on bitsandbytes layers" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
