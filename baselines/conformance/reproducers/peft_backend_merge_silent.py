#!/usr/bin/env python
"""PEFT's methods on its generic quantization backend merge into a bitsandbytes base without a rounding warning.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by TWIN-MERGE-WARNS (each method's merge into a
4-bit or 8-bit base must warn about rounding, as MERGE-WARNS-LORA and MERGE-WARNS-OFT ask).

Every ``bnb.py`` of PEFT 0.21.2 (LoRA, HiRA, PVeRA, RandLoRA, RoAd) warns "Merge ... module to 4-bit linear may get
different generations due to rounding errors." before it requantizes. The methods that reach bitsandbytes layers
through ``peft/utils/quantization_utils.py`` (``Bnb4bitBackend``/``Bnb8bitBackend``: BOFT, MiSS, OFT, SHiRA, VeRA)
dequantize, merge and requantize as well, but say nothing: a user merging them into a QLoRA base gets the same
rounding with no word about it. The model is built as users get it (``get_peft_model`` on a model marked
``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` as transformers marks one it loaded with a ``BitsAndBytesConfig``).

Run: ``python peft_backend_merge_silent.py``. Exit 1 when a merge into a quantized base emits no warning naming
rounding or quantization (LoRA is the control), 0 when every merge warns.
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


def base(bits: int) -> nn.Module:
    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 48, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def merge_warnings(config: peft.PeftConfig, bits: int) -> list[str]:
    model = OneLayer(base(bits), bits)
    peft.get_peft_model(model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.lin.merge()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def main() -> int:
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    configs = {
        "LoRA (control)": lambda: peft.LoraConfig(r=4, target_modules=["lin"]),
        "BOFT": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["lin"]),
        "MiSS": lambda: peft.MissConfig(r=8, target_modules=["lin"]),
        "OFT": lambda: peft.OFTConfig(r=8, oft_block_size=0, target_modules=["lin"]),
        "SHiRA": lambda: peft.ShiraConfig(r=4, random_seed=0, target_modules=["lin"]),
        "VeRA": lambda: peft.VeraConfig(r=8, target_modules=["lin"]),
    }
    silent = 0
    for name, make in configs.items():
        for bits in (4, 8):
            got = merge_warnings(make(), bits)
            warns = any(w in t.lower() for t in got for w in ("rounding", "quantiz"))
            print(f"{name} {bits}-bit: {'warns' if warns else 'SILENT'} {got[:1]}")
            silent += not warns and "control" not in name
    print(f"DEFECT: {silent} method/bit-width merges into a quantized base emit no rounding warning" if silent
          else "no defect")
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
