#!/usr/bin/env python
"""PEFT tuners without bitsandbytes support accept a 4-bit or 8-bit base and then crash (or crash at creation with
an error that is no refusal).

Plain torch + bitsandbytes + PEFT, no conformance import. Found by TWIN-CREATE's family ``other``: every tuner of the
installed PEFT outside the suite's method table that builds and runs on a dense ``nn.Linear`` with its defaults
(``conformance/impls/peft_tuners.py OtherTuners``), held to "refuse or work": at creation it raises ``ValueError``,
``TypeError`` or ``NotImplementedError`` with the base untouched, or every later step runs.

The model is built as users get it: ``get_peft_model`` on a one-layer model marked ``is_loaded_in_4bit`` /
``is_loaded_in_8bit`` as transformers marks one it loaded with a ``BitsAndBytesConfig``. These tuners have no
bitsandbytes dispatch, so PEFT wraps the bnb layer with its dense class, which reads the packed 4-bit bytes (uint8,
shape (in*out/2, 1)) or the int8 weight as if they were the float weight. Steps per tuner: create, an eval no-grad
forward, a train forward and backward, ``merge()`` (which must leave a packed uint8 / int8 weight), ``unmerge()``;
the first that raises (or the merge that leaves a float weight in the quantized layer) is printed.

Run: ``python peft_other_tuners_on_bnb.py``. Exit 1 when a tuner accepts a quantized base and a later step raises, or
creation raises something other than ``ValueError``/``TypeError``/``NotImplementedError``; 0 when each refuses or
works.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from torch import nn

#: the tuners of PEFT 0.21.2 outside LoRA/OFT/DoRA and the ten methods with bitsandbytes support (the suite's method
#: table) that build on a dense nn.Linear(64, 48) with their defaults, and what two need besides
TUNERS = {
    "BeftConfig": {}, "C3AConfig": {"block_size": 16}, "DeftConfig": {}, "DeloraConfig": {}, "FourierFTConfig": {},
    "FrodConfig": {}, "GloraConfig": {}, "GraloraConfig": {}, "HRAConfig": {}, "LilyConfig": {},
    "LNTuningConfig": {}, "LoHaConfig": {}, "LoKrConfig": {}, "OSFConfig": {}, "PeanutConfig": {}, "PsoftConfig": {},
    "SupertuningConfig": {}, "TinyLoraConfig": {}, "UniLoraConfig": {}, "VBLoRAConfig": {"vector_length": 16},
    "WaveFTConfig": {},
}
REFUSALS = (ValueError, TypeError, NotImplementedError)
#: tuners whose dense layer does not merge either ("This method is not supported for Lily."): no merge steps
NO_MERGE = {"LilyConfig"}


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


def first_failure(config: peft.PeftConfig, bits: int, merges: bool) -> tuple[str, str]:
    """(verdict, what): verdict 'works', 'refused' or 'DEFECT'."""
    model = OneLayer(base(bits), bits)
    try:
        peft.get_peft_model(model, config)
    except REFUSALS as e:
        return "refused", f"{type(e).__name__}: {str(e)[:120]}"
    except Exception as e:  # noqa: BLE001 - a crash at creation that is no refusal
        return "DEFECT", f"create raised {type(e).__name__}: {str(e)[:120]}"
    layer, x = model.lin, torch.randn(3, 64)

    def train_step() -> None:
        model.train()
        xg = x.clone().requires_grad_(True)
        model(xg).square().sum().backward()

    steps = [("eval forward", lambda: model.eval()(x)), ("train forward/backward", train_step)]
    if merges:
        steps += [("merge()", layer.merge), ("unmerge()", layer.unmerge)]
    for what, step in steps:
        try:
            if what == "eval forward":
                with torch.no_grad():
                    step()
            else:
                step()
        except Exception as e:  # noqa: BLE001 - the defect is any exception after an accepted create
            return "DEFECT", f"accepted, then {what} raised {type(e).__name__}: {str(e)[:120]}"
        w = layer.get_base_layer().weight
        if what == "merge()" and w.dtype not in (torch.uint8, torch.int8):
            return "DEFECT", f"accepted, then merge() left a {w.dtype} {tuple(w.shape)} weight in the {bits}-bit layer"
    return "works", ""


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defects = 0
    for cls_name, extra in TUNERS.items():
        cfg = getattr(peft, cls_name, None)
        if cfg is None:
            print(f"{cls_name}: not in this PEFT")
            continue
        for bits in (4, 8):
            verdict, what = first_failure(cfg(target_modules=["lin"], **extra), bits, cls_name not in NO_MERGE)
            print(f"{cls_name} {bits}-bit: {verdict}{': ' + what if what else ''}")
            defects += verdict == "DEFECT"
    print(f"DEFECT: {defects} tuner/bit-width pairs accept a quantized base and crash" if defects else "no defect")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
