"""PEFT 0.21.2 + bitsandbytes 0.50.x: merging a LoRA adapter into an 8-bit base that keeps float16 weights
(``bnb.nn.Linear8bitLt(has_fp16_weights=True)``, bitsandbytes' default and LitGPT's int8 training mode) crashes or
writes a wrong weight.

Such a base stores its weight in float16 and quantizes it row-wise at each forward; it has no ``weight.SCB``, and
its ``state.SCB`` exists only once a forward has run. PEFT's merge (``peft/tuners/lora/bnb.py`` ``Linear8bitLt.merge``)
reads the base with ``peft/utils/integrations.py`` ``dequantize_bnb_weight``, which for any 8-bit weight calls
``bnb.functional.int8_vectorwise_dequant(weight.data, state.SCB)``:

- before any forward ``state.SCB`` is None: ``AttributeError: 'NoneType' object has no attribute 'to'``;
- after a forward it multiplies the float16 weight itself by ``SCB / 127`` (bitsandbytes' CPU kernel does not check
  that the input is int8): the merged weight is the base scaled row by row by its absmax / 127, plus the delta.

The merged weight is also stored as float32 (``Int8Params(w_data.to("cpu"), has_fp16_weights=True)`` keeps the
dtype of ``w_data``), where the base held float16. OFT's 8-bit merge (``peft/tuners/oft/bnb.py``) reads the same way.

Run: python baselines/conformance/reproducers/peft_merge_fp16_weights_8bit.py
Exit 1: reproduced (a crash, or a merged weight off by more than one int8 requantization); 0: the merge is right.
Uses peft, bitsandbytes and torch only."""

import sys

import bitsandbytes as bnb
import peft
import torch
from peft import LoraConfig, get_peft_model


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=True, threshold=0.0)
        # a frozen float16 weight, as an adapter's base is (bitsandbytes keeps it float16 on .to(device))
        self.proj.weight = bnb.nn.Int8Params((torch.randn(48, 64) / 8).half(), requires_grad=False,
                                             has_fp16_weights=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build() -> torch.nn.Module:
    tiny = Tiny().to("cpu")
    tiny.is_loaded_in_8bit = True  # what transformers sets on an 8-bit model: PEFT then puts its bnb LoRA layer on it
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["proj"], init_lora_weights=False)
    return get_peft_model(tiny, config)


def int8_weight(base: torch.nn.Module) -> torch.Tensor:
    """What bitsandbytes multiplies by: the float16 weight quantized and dequantized row-wise by its own functions."""
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(base.weight.data.to(torch.float16).contiguous())
    return bnb.functional.int8_vectorwise_dequant(cb, scb).double()


print(f"peft {peft.__version__}, bitsandbytes {bnb.__version__}, torch {torch.__version__}")
failed = False

# 1. merge before any forward
model = build()
lora = model.base_model.model.proj
try:
    lora.merge()
    print("merge before any forward: ran")
except AttributeError as exc:
    print(f"REPRODUCED (merge before any forward): AttributeError: {exc}")
    failed = True

# 2. merge after a training-mode forward (state.SCB now set from the float16 weight)
model = build()
lora = model.base_model.model.proj
base = lora.base_layer
x = torch.randn(3, 64)
with torch.no_grad():
    lora(x)
    w16 = base.weight.data.double()
    delta = lora.get_delta_weight("default").double()
    lora.merge()
got = base.weight.data.double()
# the right merge adds the delta to the float16 weight, or to its int8 form (dequantize -> add -> requantize): the two
# differ by one int8 rounding (row absmax / 254); storing the sum in float16 rounds by 2**-11 relative
want = w16 + delta
allowed = w16.abs().amax(dim=1, keepdim=True) / 254 + want.abs() * 2.0**-10
ratio = float(((got - want).abs() / allowed).max())
print(f"merge after a forward: stored {base.weight.dtype} (the base held torch.float16); merged weight vs W16 + delta: "
      f"max |diff| {float((got - want).abs().max()):.3g}, {ratio:.3g} x what one int8 rounding allows")
if ratio > 1:
    print("REPRODUCED (merge after a forward): dequantize_bnb_weight multiplied the float16 weight by SCB / 127")
    failed = True
if base.weight.dtype != torch.float16:
    print(f"REPRODUCED: the merged base stores {base.weight.dtype}, not the float16 it held")
    failed = True
sys.exit(1 if failed else 0)
