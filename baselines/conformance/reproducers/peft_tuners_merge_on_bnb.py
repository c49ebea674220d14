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
- RandLoRA, 4-bit and 8-bit: ``get_delta_weight`` of the bnb classes multiplies ``update_B @ update_A``, while the
  forward applies ``update_B`` first (``F.linear(F.linear(x, update_B), update_A)``, a delta ``update_A @
  update_B``). On a non-square layer ``merge()`` raises (``mat1 and mat2 shapes cannot be multiplied``); on a square
  8-bit layer it merges the wrong delta (the merged output moves by more than the outputs' size); on a square 4-bit
  layer it also writes a dense float32 weight into the ``Params4bit``, as PVeRA's does.
- RoAd, 4-bit with a bfloat16 compute dtype, after a forward (bitsandbytes then holds the bias in bfloat16):
  ``unmerge()`` raises (``addmv input tensors must have the same dtype``).

Run: ``python peft_tuners_merge_on_bnb.py``. Exit 1 when any of them reproduces, 0 when every merge and unmerge runs,
leaves a 4-bit/8-bit base and keeps the output within 10% (a merge's rounding is far below that).
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


def base(bits: int, compute_dtype: torch.dtype, out: int = 48) -> nn.Module:
    torch.manual_seed(0)
    w = torch.randn(out, 64) / 8
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, out, compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, out, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def run(config: peft.PeftConfig, bits: int, compute_dtype: torch.dtype, out: int) -> str | None:
    model = OneLayer(base(bits, compute_dtype, out), bits)
    peft.get_peft_model(model, config)
    layer = model.lin
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(3, 64, dtype=compute_dtype)
        y0 = layer(x)  # a forward first, as after training (bitsandbytes casts the bias)
    try:
        layer.merge()
    except Exception as e:  # noqa: BLE001 - the defect is any exception here
        return f"merge() raised {type(e).__name__}: {e}"
    w = layer.get_base_layer().weight
    if bits == 4 and w.dtype != torch.uint8:
        return f"after merge() the 4-bit base holds a {w.dtype} {tuple(w.shape)} weight"
    with torch.no_grad():
        gap, scale = float((layer(x) - y0).abs().max()), float(y0.abs().max())
    if gap > 0.1 * scale:  # a demonstration: a merge changes outputs by its rounding, far below 10% of them
        return f"merge() changes the output by up to {gap:.3g} (outputs up to {scale:.3g})"
    try:
        layer.unmerge()
    except Exception as e:  # noqa: BLE001
        return f"unmerge() raised {type(e).__name__}: {e}"
    return None


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [
        ("PVeRA 4-bit 64x48", peft.PveraConfig(r=4, target_modules=["lin"]), 4, f32, 48),
        ("RandLoRA 4-bit 64x48", peft.RandLoraConfig(r=4, target_modules=["lin"]), 4, f32, 48),
        ("RandLoRA 8-bit 64x48", peft.RandLoraConfig(r=4, target_modules=["lin"]), 8, f32, 48),
        ("RandLoRA 4-bit 64x64", peft.RandLoraConfig(r=4, target_modules=["lin"]), 4, f32, 64),
        ("RandLoRA 8-bit 64x64", peft.RandLoraConfig(r=4, target_modules=["lin"]), 8, f32, 64),
        ("RoAd 4-bit bf16", peft.RoadConfig(group_size=8, target_modules=["lin"]), 4, bf16, 48),
        ("VeRA 4-bit (control)", peft.VeraConfig(r=8, target_modules=["lin"]), 4, f32, 48),
    ]
    defect = False
    for name, config, bits, dtype, out in cases:
        what = run(config, bits, dtype, out)
        print(f"{name}: {'ok' if what is None else what}")
        defect |= what is not None and "control" not in name
    print("DEFECT: PEFT merge/unmerge of PVeRA/RandLoRA/RoAd on bitsandbytes layers" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
