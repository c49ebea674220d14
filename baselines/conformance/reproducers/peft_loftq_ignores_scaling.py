#!/usr/bin/env python
"""PEFT's LoftQ fits the quantization error with B A and the forward scales it by lora_alpha / r on top.

Plain torch + bitsandbytes + PEFT, no conformance import; needs CUDA (PEFT 0.21.2 computes LoftQ on cuda or xpu:
``src/peft/utils/loftq_utils.py _loftq_init_new``, ``compute_device``). Found by INIT-RESIDUAL (PEFT 34): one LoftQ
step with the quantized base kept must make ``scaling * B A`` the best rank-r fit of ``W - dequant(Q)`` (its truncated
SVD, Eckart-Young).

``replace_lora_weights_loftq`` (the documented path for a model bitsandbytes already quantized) sets
``lora_A = R``, ``lora_B = L`` with ``L R`` the truncated SVD of ``W - dequant(Q)`` (``_low_rank_decomposition``), and
never divides by the scaling the layer's forward multiplies with. With ``lora_alpha = 2 r`` the adapter adds twice the
fitted error, and since the fit is orthogonal to what it leaves, ``||E - 2 E_r|| = ||E||``: the quantization error is
exactly as large as without LoftQ; with larger alpha it is larger. Only ``lora_alpha == r`` gives the LoftQ fit.
``LoraConfig(init_lora_weights="loftq")`` (``loftq_init``) assigns the same ``R, L``.

Run: ``python peft_loftq_ignores_scaling.py`` on a CUDA machine. Exit 1 while the error with the adapter is above the
truncated SVD's for some alpha, 0 when it is the best fit for every alpha, 2 without CUDA.
"""

import sys
import tempfile
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.loftq_utils import replace_lora_weights_loftq
from safetensors.torch import save_file
from torch import nn

warnings.simplefilter("ignore")


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.lin = base
        self.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA (PEFT computes LoftQ on cuda or xpu)")
        return 2
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, "
          f"{torch.cuda.get_device_name(0)}")
    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    r = 4
    defects = []
    for alpha in (4, 8, 16):
        layer = bnb.nn.Linear4bit(64, 48, bias=False, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
        layer = layer.cuda()
        model = get_peft_model(OneLayer(layer), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]))
        with tempfile.TemporaryDirectory() as tmp:
            save_file({"lin.weight": w}, f"{tmp}/model.safetensors")
            replace_lora_weights_loftq(model, model_path=tmp)
        lin = model.base_model.model.lin
        q = bnb.functional.dequantize_4bit(lin.base_layer.weight.data, lin.base_layer.weight.quant_state).double().cpu()
        a, b = lin.lora_A["default"].weight.double().cpu(), lin.lora_B["default"].weight.double().cpu()
        s = lin.scaling["default"]
        err = w.double() - q
        before, after = float(err.norm()), float((err - s * b @ a).norm())
        best = float(torch.linalg.svdvals(err)[r:].norm())
        print(f"  lora_alpha={alpha} (scaling {s:g}): ||W-Q|| {before:.5f}, with the adapter {after:.5f}, "
              f"truncated SVD {best:.5f}")
        if after > best * (1 + 1e-4):
            defects.append(f"PEFT 34: lora_alpha={alpha}, r={r}: ||W - Q - scaling B A|| = {after:.5f} > the rank-{r} "
                           f"fit's {best:.5f} (without the adapter {before:.5f})")
    for d in defects:
        print("DEFECT", d)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
