#!/usr/bin/env python
"""PEFT DoRA over a bitsandbytes ``Linear8bitLt`` that keeps float16 weights (``has_fp16_weights=True``): the layer
cannot be built before a forward, and after one its magnitude is initialised from a wrong weight.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the merge clauses' DoRA families
(``MERGE-FORWARD-BOUND`` and ``MERGE-KEEPS-QUANT-SETTINGS`` on the ``has_fp16_weights`` bases: the layer's
construction raises).

What happens (PEFT 0.21.2, bitsandbytes 0.50.2, CPU): ``LoraConfig(use_dora=True)`` initialises the magnitude as the
row norms of the base weight (``peft/tuners/lora/dora.py DoraLinearLayer.update_layer`` ->
``peft/utils/integrations.py dequantize_module_weight`` -> ``dequantize_bnb_weight``), which treats every 8-bit
weight as int8: ``int8_vectorwise_dequant(weight.data, state.SCB)``. A ``has_fp16_weights`` base holds its weight in
float16 and has no ``weight.SCB``; ``state.SCB`` exists only once a forward has run. So the DoRA layer raises
``AttributeError: 'NoneType' object has no attribute 'to'`` when built before any forward (plain LoRA on the same
base builds); built after one forward, the float16 weight itself is multiplied by ``SCB / 127`` and the magnitude is
the norm of that product, not of the weight (with ``B = 0`` the adapter must start as the identity, ``m = ||W0||_c``).
The same ``dequantize_bnb_weight`` makes the 8-bit merge of such a base wrong (PEFT finding 14,
``peft_merge_fp16_weights_8bit.py``); DoRA meets it already at construction and in every forward
(``DoraLinearVariant.forward`` reads the weight the same way).

Run: ``python peft_dora_fp16_weights_8bit.py``. Exit 1 when the defect reproduces (construction raises, or the
initial magnitude is off the float16 weight's row norms by more than float16 rounding), 0 when fixed.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft.tuners.lora import bnb as peft_bnb


def base_layer() -> bnb.nn.Linear8bitLt:
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=True, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(48, 64).half() * 0.1, requires_grad=False, has_fp16_weights=True)
    return layer.to("cpu")  # stays float16: no CB, no SCB


def build(base: bnb.nn.Linear8bitLt, use_dora: bool) -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora)
    return peft_bnb.Linear8bitLt(base, "default", config=config, r=4, lora_alpha=8)


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defect = False
    for use_dora in (False, True):
        name = "DoRA" if use_dora else "LoRA"
        try:
            build(base_layer(), use_dora)
            print(f"{name}, built before any forward: ok")
        except Exception as e:  # noqa: BLE001 - the defect is any exception here
            print(f"{name}, built before any forward: {type(e).__name__}: {e}")
            defect |= use_dora
    base = base_layer()
    w0 = base.weight.data.float().clone()
    with torch.no_grad():
        base(torch.randn(3, 64))  # sets state.SCB
    try:
        layer = build(base, True)
    except Exception as e:  # noqa: BLE001
        print(f"DoRA, built after one forward: {type(e).__name__}: {e}")
        defect = True
    else:
        m = layer.lora_magnitude_vector["default"].weight.detach().float()
        want = torch.linalg.vector_norm(w0, dim=1)
        rel = float(((m - want).abs() / want).max())
        # the weight is float16: its row norms in float32 are off by a few float32 roundings at most
        ok = rel <= 1e-5
        print(f"DoRA, built after one forward: magnitude vs the float16 weight's row norms: max relative error "
              f"{rel:.3g} ({'ok' if ok else 'wrong'}; m[:3] = {m[:3].tolist()}, ||W0||_c[:3] = {want[:3].tolist()})")
        defect |= not ok
    print("DEFECT: PEFT DoRA on a has_fp16_weights Linear8bitLt reads the float16 weight as int8" if defect
          else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
