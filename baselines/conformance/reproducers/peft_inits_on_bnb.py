#!/usr/bin/env python
"""PEFT's LoRA initializations that rewrite the base (PiSSA, OLoRA, CorDA, LoRA-GA) on bitsandbytes layers.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the INIT-* clauses: an initialization on a quantized
base either refuses at creation (ValueError/TypeError/NotImplementedError, base untouched) or leaves a valid quantized
base with its original settings, base + adapter equal to the original weight within the requantization bound, and the
output at init equal to the original output. The model is built as users get it (``get_peft_model`` on a model marked
``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` as transformers marks one it loaded with a ``BitsAndBytesConfig``).

- PEFT 29: PiSSA on a Linear4bit whose ``quant_storage`` is a float dtype (``bnb_4bit_quant_storage=torch.bfloat16``,
  how FSDP-QLoRA loads) passes ``pissa_init``'s dtype check and decomposes the packed storage, shape (in*out/2, 1):
  the adapter gets shapes (1, 1) and (in*out/2, 1), the packed bytes are overwritten (same shape and dtype, still
  "quantized"), the first forward raises. With uint8 storage the same call refuses with a TypeError.
- PEFT 30: CorDA on a Linear4bit: ``preprocess_corda`` (``collect_eigens_for_layer``: ``linear.weight.data.float()``)
  multiplies the packed storage by the covariance and raises a RuntimeError (a shape mismatch), no refusal.
- PEFT 31: OLoRA requantizes the residual with other settings than the base's: ``Params4bit`` is rebuilt without
  ``blocksize`` (a blocksize-128 base comes back with 64) and from the float32 residual (a bfloat16 checkpoint's
  base, ``quant_state.dtype`` bfloat16, comes back float32); on an 8-bit base with float16 weights
  (``has_fp16_weights=True``) it raises AttributeError ('NoneType' object has no attribute 'to': no SCB to
  dequantize with).
- PEFT 32: LoRA-GA on a Linear8bitLt (int8 weights): ``preprocess_loraga`` refuses 4-bit bases with a ValueError
  naming the quantized module but not 8-bit ones; there it raises RuntimeError "only Tensors of floating point and
  complex dtype can require gradients".
- PEFT 33: PiSSA on an 8-bit base with float16 weights that ran an eval forward before: ``pissa_init`` writes the
  residual into ``weight.data`` but leaves ``Linear8bitLt.state`` (CB/SCB cached by that forward) alone, so the next
  forward multiplies by the old weight and adds the adapter on top: the output at init is off by the adapter's
  contribution. ``state.reset_grads()`` restores it. CorDA's calibration forwards do the same to every such base.

Run: ``python peft_inits_on_bnb.py``. Exit 1 while any of these reproduces, 0 when none does.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.simplefilter("ignore")


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.lin = base
        bits = 4 if isinstance(base, bnb.nn.Linear4bit) else 8
        setattr(self, f"is_loaded_in_{bits}bit", True)  # what transformers' bnb quantizers set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def weight(n_in: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(48, n_in) / n_in**0.5


def four_bit(storage: torch.dtype = torch.uint8, blocksize: int = 64, dtype: torch.dtype = torch.float32,
             n_in: int = 64) -> nn.Module:
    layer = bnb.nn.Linear4bit(n_in, 48, bias=False, compute_dtype=dtype, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight(n_in).to(dtype), requires_grad=False, blocksize=blocksize,
                                     quant_type="nf4", quant_storage=storage, module=layer)
    return layer.to("cpu")


def eight_bit(fp16_weights: bool = False) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(64, 48, bias=False, has_fp16_weights=fp16_weights, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(weight().half(), requires_grad=False, has_fp16_weights=fp16_weights)
    return layer.to("cpu")


def lora(base: nn.Module, init: str, **extra) -> nn.Module:
    model = OneLayer(base)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=init, **extra))
    return model.lin


def pissa_float_storage() -> list[str]:
    out = []
    x = torch.randn(3, 64)
    for storage in (torch.bfloat16, torch.float16, torch.float32):
        try:
            layer = lora(four_bit(storage), "pissa")
        except (ValueError, TypeError, NotImplementedError) as exc:
            print(f"  pissa, quant_storage={storage}: refused ({type(exc).__name__})")
            continue
        except Exception as exc:  # noqa: BLE001
            out.append(f"PEFT 29: pissa on Linear4bit(quant_storage={storage}) raised {type(exc).__name__}: {exc}")
            continue
        shapes = (tuple(layer.lora_A["default"].weight.shape), tuple(layer.lora_B["default"].weight.shape))
        try:
            layer(x)
            ran = "the forward runs"
        except Exception as exc:  # noqa: BLE001
            ran = f"the forward raises {type(exc).__name__}"
        out.append(f"PEFT 29: pissa on Linear4bit(quant_storage={storage}) accepted: lora_A/lora_B {shapes}, "
                   f"expected ((4, 64), (48, 4)); {ran}")
    return out


def corda_4bit() -> list[str]:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = OneLayer(four_bit())
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="corda",
                     corda_config=CordaConfig())
    rows = torch.randn(256, 64)
    try:
        preprocess_corda(model, cfg, run_model=lambda: model(rows))
        get_peft_model(model, cfg)
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"  corda 4-bit: refused ({type(exc).__name__}: {exc})")
        return []
    except Exception as exc:  # noqa: BLE001
        return [f"PEFT 30: corda on Linear4bit raised {type(exc).__name__}: {exc}"]
    return []


def olora_settings() -> list[str]:
    out = []
    base = four_bit(blocksize=128, n_in=128)
    layer = lora(base, "olora")
    if layer.base_layer.weight.blocksize != 128:
        out.append(f"PEFT 31: olora requantized a blocksize-128 base with blocksize "
                   f"{layer.base_layer.weight.blocksize}")
    base = four_bit(dtype=torch.bfloat16)
    layer = lora(base, "olora")
    if layer.base_layer.weight.quant_state.dtype != torch.bfloat16:
        out.append(f"PEFT 31: olora requantized a base quantized from bfloat16 from "
                   f"{layer.base_layer.weight.quant_state.dtype}")
    try:
        lora(eight_bit(fp16_weights=True), "olora")
    except Exception as exc:  # noqa: BLE001
        out.append(f"PEFT 31: olora on Linear8bitLt(has_fp16_weights=True) raised {type(exc).__name__}: {exc}")
    return out


def loraga_8bit() -> list[str]:
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    out = []
    for name, base in (("Linear4bit", four_bit()), ("Linear8bitLt", eight_bit())):
        model = OneLayer(base)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="lora_ga",
                         lora_ga_config=LoraGAConfig())
        rows = torch.randn(32, 64).half() if name == "Linear8bitLt" else torch.randn(32, 64)
        try:
            preprocess_loraga(model, cfg, train_step=lambda m=model, r=rows: m(r).float().square().mean().backward())
            get_peft_model(model, cfg)
            print(f"  lora_ga on {name}: accepted")
        except (ValueError, TypeError, NotImplementedError) as exc:
            print(f"  lora_ga on {name}: refused ({type(exc).__name__}: {exc})")
        except Exception as exc:  # noqa: BLE001
            out.append(f"PEFT 32: lora_ga on {name} raised {type(exc).__name__}: {exc}")
    return out


def pissa_stale_state() -> list[str]:
    base = eight_bit(fp16_weights=True)
    base.eval()
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        y0 = base(x)
    layer = lora(base, "pissa")
    with torch.no_grad():
        y1 = layer(x)
    layer.base_layer.state.reset_grads()
    with torch.no_grad():
        y2 = layer(x)
    d1, d2 = float((y1 - y0).abs().max()), float((y2 - y0).abs().max())
    print(f"  pissa on a warm has_fp16_weights base: max |y_init - y_before| {d1:.3g}; after state.reset_grads() "
          f"{d2:.3g}")
    return [f"PEFT 33: pissa on Linear8bitLt(has_fp16_weights=True) after an eval forward changes the output at init "
            f"by {d1:.3g} (stale state.CB/SCB; {d2:.3g} once reset)"] if d1 > 10 * d2 else []


def main() -> int:
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defects = []
    for check in (pissa_float_storage, corda_4bit, olora_settings, loraga_8bit, pissa_stale_state):
        defects += check()
    for d in defects:
        print("DEFECT", d)
    print(f"{len(defects)} defect(s)")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
