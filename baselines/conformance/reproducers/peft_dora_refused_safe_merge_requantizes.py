#!/usr/bin/env python
"""PEFT DoRA on a bitsandbytes ``Linear4bit``/``Linear8bitLt``: a safe merge that is refused (non-finite adapter)
still rewrites the base weights when another adapter is merged.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the stateful conformance machine
(STATE-INVALID-STEP-SAFE, its ``poison_safe_merge`` step: an invalid step must raise and change nothing).

What happens (PEFT 0.21.2, bitsandbytes 0.50.2, CPU): ``DoraLinearVariant.merge_safe`` (peft/tuners/lora/variants.py)
takes the weight norm on the *unmerged* base weight through ``LoraLayer._unmerged_base_weight``
(peft/tuners/lora/layer.py), which unmerges every merged adapter (dequantize, remove, requantize), reads the weight,
and merges them again in its ``finally`` (dequantize, apply, requantize). Only afterwards does ``bnb.py``'s
``merge`` check ``torch.isfinite(w_data)`` and raise ``ValueError``. The refusal comes after two requantizations of
the merged adapter: the packed bytes differ from those before the call. Plain LoRA on the same layer refuses without
touching the base.

Run: ``python peft_dora_refused_safe_merge_requantizes.py``. Exit 1 when the defect reproduces (a refused safe merge
changed the base's bytes), 0 when every refused safe merge leaves them as they were.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft.tuners.lora import bnb as peft_bnb


def base_layer(bits: int) -> torch.nn.Module:
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 40, bias=True, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")  # quantizes


def packed(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    base = layer.get_base_layer()
    out = {"weight": base.weight.data.detach().clone()}
    qs = getattr(base.weight, "quant_state", None)
    if qs is not None:
        out["absmax"] = qs.absmax.detach().clone()
    scb = getattr(base.weight, "SCB", None)
    if scb is None and hasattr(base, "state"):
        scb = base.state.SCB
    if scb is not None:
        out["SCB"] = scb.detach().clone()
    return out


def refused_merge_changes(bits: int, use_dora: bool) -> str | None:
    """None when the refused safe merge left the base's bytes alone, else what changed."""
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, init_lora_weights=False)
    cls = peft_bnb.Linear4bit if bits == 4 else peft_bnb.Linear8bitLt
    torch.manual_seed(1)
    layer = cls(base_layer(bits), "a0", config=config, r=4, lora_alpha=8)
    layer.update_layer("a1", 4, lora_alpha=8, config=config)  # what PEFT's tuner model does for a second adapter
    layer.merge(safe_merge=True, adapter_names=["a0"])
    before = packed(layer)
    with torch.no_grad():
        layer.lora_B["a1"].weight[0, 0] = float("nan")
    try:
        layer.merge(safe_merge=True, adapter_names=["a1"])
        return "the safe merge of a NaN adapter did not raise"
    except ValueError:
        pass
    after = packed(layer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if not changed:
        return None
    diff = [int((before[k] != after[k]).sum()) for k in changed]
    return (f"refused, but the base changed: {', '.join(f'{k} ({n} entries)' for k, n in zip(changed, diff))}; "
            f"merged_adapters={layer.merged_adapters}")


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defect = False
    for bits in (4, 8):
        for use_dora in (False, True):
            what = refused_merge_changes(bits, use_dora)
            print(f"{'DoRA' if use_dora else 'LoRA'} {bits}-bit, a0 merged, safe merge of a NaN a1: "
                  f"{'refused, base unchanged' if what is None else what}")
            defect |= use_dora and what is not None
    print("DEFECT: a refused DoRA safe merge requantized the merged adapters (the base changed)" if defect
          else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
