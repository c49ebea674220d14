#!/usr/bin/env python
"""PEFT DoRA on a bitsandbytes layer: a 1-D input gives a 2-D output ``(1, out_features)``.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by ``FWD-INIT-IDENTITY`` and ``FWD-ORACLE`` (1-D
inputs; the output must have the input's leading dims, as the base layer's and plain LoRA's have).

What happens (PEFT 0.21.2, bitsandbytes 0.50.2): ``peft/tuners/lora/dora.py DoraLinearLayer.forward`` shapes the
DoRA factor as a row, ``mag_norm_scale = (magnitude / weight_norm).view(1, -1)``, and returns
``(mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling``; for a 1-D input ``base_result`` is
``(out_features,)`` and the product broadcasts to ``(1, out_features)``, which ``lora/bnb.py`` adds to the base
output: the layer returns ``(1, out_features)`` where the base layer (and the same layer with ``use_dora=False``)
returns ``(out_features,)``. The values are right; only the shape changes. Train and eval mode alike; shown on a 4-bit
base (the code path is the same for ``Linear8bitLt``, where on the CPU PEFT's int8 re-wrap,
``peft_dora_int8_cpu_second_forward.py``, gets in the way first).

Run: ``python peft_dora_1d_input_shape.py``. Exit 1 when the defect reproduces (a DoRA output shape differs from the
base layer's), 0 when every output has the base layer's shape.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft.tuners.lora import bnb as peft_bnb


def base_4bit() -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")  # quantizes


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defect = False
    for bits, make, cls in ((4, base_4bit, peft_bnb.Linear4bit),):
        for use_dora in (False, True):
            for training in (False, True):
                base = make()
                x = torch.randn(64)
                with torch.no_grad():
                    want = tuple(base(x.unsqueeze(0)).squeeze(0).shape)  # (out_features,)
                config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora)
                layer = cls(base, "default", config=config, r=4, lora_alpha=8, use_dora=use_dora).train(training)
                with torch.no_grad():
                    got = tuple(layer(x).shape)
                name = f"{bits}-bit {'DoRA' if use_dora else 'LoRA'} {'train' if training else 'eval'}"
                print(f"{name}: input (64,) -> output {got}, base layer gives {want}")
                defect |= got != want
    print("DEFECT: PEFT DoRA turns a 1-D input's output into (1, out_features)" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
