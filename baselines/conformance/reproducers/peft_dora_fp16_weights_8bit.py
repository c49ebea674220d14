#!/usr/bin/env python
"""PEFT DoRA on a bitsandbytes ``Linear8bitLt(has_fp16_weights=True)``: creating it raises, or its magnitude is wrong.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by ``FWD-INIT-IDENTITY`` (the initial magnitude must
be the row norms of the base weight) and ``FWD-ORACLE`` on the ``has_fp16_weights`` bases.

What happens (PEFT 0.21.2, bitsandbytes 0.50.2): DoRA reads the base weight through
``peft/utils/integrations.py dequantize_module_weight`` -> ``dequantize_bnb_weight``, at creation
(``peft/tuners/lora/dora.py DoraLinearLayer.update_layer``: the magnitude is the norm of that weight) and in every
forward. ``dequantize_bnb_weight`` treats every 8-bit weight as int8, ``int8_vectorwise_dequant(weight.data,
state.SCB)``; a base that keeps float16 weights has no ``weight.SCB``, and ``state.SCB`` exists only once a forward
has run. So before any forward, creating the DoRA layer raises ``AttributeError: 'NoneType' object has no attribute
'to'``; after a forward it multiplies the float16 weight itself by ``SCB / 127`` and the magnitude (and every
forward's norm) is that of a weight scaled by ``SCB / 127`` instead of the base weight's. The same root cause as
PEFT's 8-bit merge into such a base (``peft_merge_fp16_weights_8bit.py``); plain LoRA's forward does not dequantize
and is right.

Run: ``python peft_dora_fp16_weights_8bit.py``. Exit 1 when the defect reproduces (creation raises, or the magnitude
is farther from the row norms than float16 rounding allows), 0 when both are right.
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
    layer.weight = bnb.nn.Int8Params(torch.randn(48, 64).half(), requires_grad=False, has_fp16_weights=True)
    return layer.to("cpu")  # has_fp16_weights: the weight stays float16


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defect = False
    for forward_first in (False, True):
        base = base_layer()
        if forward_first:
            with torch.no_grad():
                base(torch.randn(2, 64).half())  # fills base.state (CB, SCB)
        w = base.weight.data.clone()
        what = "after a base forward" if forward_first else "before any forward"
        config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True)
        try:
            layer = peft_bnb.Linear8bitLt(base, "default", config=config, r=4, lora_alpha=8, use_dora=True)
        except Exception as e:  # noqa: BLE001 - the defect is any exception here
            print(f"DoRA created {what}: raised {type(e).__name__}: {e}")
            defect = True
            continue
        m = layer.lora_magnitude_vector["default"].weight.detach().double()
        n = torch.linalg.vector_norm(w.double(), dim=1)  # B = 0: the magnitude should be these row norms
        tol = 64 * 2.0**-10 * n  # generous: float16 rounding of 64 squares, their sum and the square root
        err = (m - n).abs()
        print(f"DoRA created {what}: max |m - ||W||_c| = {err.max():.4g} (row norms up to {n.max():.4g}, "
              f"float16 tolerance {tol.max():.3g}); max m / ||W||_c = {(m / n).max():.4g}")
        defect |= bool((err > tol).any())
    print("DEFECT: PEFT DoRA on a has_fp16_weights 8-bit base reads its weight as int8" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
