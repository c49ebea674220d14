#!/usr/bin/env python
"""PEFT's AdaLoRA on bitsandbytes layers cannot merge, and says nothing: a bare ``NotImplementedError``.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the TWIN-* clauses' feature detection
(``conformance/impls/peft_tuners.py``: a bnb tuner class without a ``merge`` of its own).

``peft/tuners/adalora/bnb.py`` (``SVDLinear4bit``, ``SVDLinear8bitLt``) defines no ``merge``/``unmerge``, so
``BaseTunerLayer.merge`` runs: ``raise NotImplementedError`` with no message (PEFT 0.21.2,
``peft/tuners/tuners_utils.py``). A user's ``merge_and_unload()`` of a QLoRA-style AdaLoRA model ends in an exception
that names neither the method nor the quantized layer (AdaLoRA's dense layer merges). IA3, whose bnb layers cannot
merge either, is the control: its model refuses with "Cannot merge ia3 layers when the model is loaded in 4-bit
mode" (``peft/tuners/ia3/model.py``).

Run: ``python peft_adalora_merge_bare_error.py``. Exit 1 when a merge on a 4-bit base raises an error with no
message, 0 when it merges or refuses with a message.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from torch import nn


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.lin = base
        self.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def base() -> nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    configs = {"AdaLoRA": peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin"]),
               "IA3": peft.IA3Config(target_modules=["lin"], feedforward_modules=[])}
    defect = False
    for name, config in configs.items():
        model = peft.get_peft_model(OneLayer(base()), config)
        try:
            model.merge_and_unload()
            print(f"{name}: merged")
        except Exception as e:  # noqa: BLE001 - what it raises is the question
            print(f"{name}: merge_and_unload() raised {type(e).__name__}: {str(e)!r}")
            defect |= name == "AdaLoRA" and not str(e).strip()
    print("DEFECT: merge of AdaLoRA on Linear4bit raises an error with no message" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
