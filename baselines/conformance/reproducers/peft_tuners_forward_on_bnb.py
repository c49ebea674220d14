#!/usr/bin/env python
"""PEFT's SHiRA and HiRA on bitsandbytes layers: the forward raises for the bases users train on.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the TWIN-* clauses (each method on a bitsandbytes
base against its dense twin; ``python -m conformance run --impl peft --clauses 'TWIN-*'``).

The model is built as users get it: ``get_peft_model`` on a model marked ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``
as transformers marks one it loaded with a ``BitsAndBytesConfig``. What happens (PEFT 0.21.2, bitsandbytes 0.50.2,
torch 2.13 CPU):

- SHiRA (generic quantization backend, ``peft/tuners/shira/layer.py``), 4-bit with a float16 or bfloat16 compute
  dtype, and 8-bit (a float16 checkpoint's bias) in eval mode: the forward raises ``... must have the same dtype`` (the sparse delta stays float32
  while the base output is half precision: 8-bit eval forwards compute in float16). A 4-bit base with a float32
  compute dtype runs.
- HiRA (``peft/tuners/hira/bnb.py``) and SHiRA on an 8-bit base that keeps float16 weights (``has_fp16_weights=True``,
  bitsandbytes' default and LitGPT's int8 training mode): the forward raises in
  ``peft/utils/integrations.py dequantize_bnb_weight`` (``'NoneType' object has no attribute 'to'``: the weight has
  no ``SCB``).

Every forward here is an eval-mode no-grad one. Run: ``python peft_tuners_forward_on_bnb.py``. Exit 1 when any of
them reproduces, 0 when every forward runs.
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


def base(bits: int, compute_dtype: torch.dtype, fp16_weights: bool = False) -> nn.Module:
    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 48, compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=fp16_weights)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=fp16_weights, has_fp16_weights=fp16_weights)
        layer.bias.data = layer.bias.data.half()  # a float16 checkpoint (from_pretrained(torch_dtype=float16))
    return layer.to("cpu")


def forward(config: peft.PeftConfig, layer: nn.Module, bits: int, dtype: torch.dtype) -> str | None:
    model = OneLayer(layer, bits)
    peft.get_peft_model(model, config)
    model.eval()  # inference, or the evaluation inside training
    try:
        with torch.no_grad():
            model(torch.randn(3, 64, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - the defect is any exception here
        return f"forward raised {type(e).__name__}: {e}"
    return None


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    shira = lambda: peft.ShiraConfig(r=4, random_seed=0, target_modules=["lin"])  # noqa: E731
    hira = lambda: peft.HiraConfig(r=4, target_modules=["lin"])  # noqa: E731
    cases = [
        ("SHiRA 4-bit float32 compute (control)", shira(), base(4, torch.float32), 4, torch.float32),
        ("SHiRA 4-bit bfloat16 compute", shira(), base(4, torch.bfloat16), 4, torch.bfloat16),
        ("SHiRA 4-bit float16 compute", shira(), base(4, torch.float16), 4, torch.float16),
        ("SHiRA 8-bit", shira(), base(8, torch.float32), 8, torch.float32),
        ("HiRA 8-bit (control)", hira(), base(8, torch.float32), 8, torch.float32),
        ("HiRA 8-bit has_fp16_weights", hira(), base(8, torch.float32, fp16_weights=True), 8, torch.float32),
        ("SHiRA 8-bit has_fp16_weights", shira(), base(8, torch.float32, fp16_weights=True), 8, torch.float32),
    ]
    defect = False
    for name, config, layer, bits, dtype in cases:
        what = forward(config, layer, bits, dtype)
        print(f"{name}: {'ok' if what is None else what}")
        defect |= what is not None and "control" not in name
    print("DEFECT: PEFT SHiRA/HiRA forward on bitsandbytes layers" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
