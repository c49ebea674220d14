#!/usr/bin/env python
"""PEFT DoRA on a bitsandbytes layer: an unbatched (1-D) input gives a 2-D output, ``(1, out_features)``.

Plain torch + bitsandbytes + PEFT, no conformance import. Found by the conformance clauses BACKPROP-GRAD-F64 and
BACKPROP-NOGRAD-FORWARD (the output has the input's leading dims), dora families, 1-D input cases.

What happens (PEFT 0.21.2, ``peft/tuners/lora/dora.py`` ``DoraLinearLayer.forward``): the DoRA factor is reshaped
to a row, ``mag_norm_scale = (magnitude / weight_norm).view(1, -1)``, and ``(mag_norm_scale - 1) * base_result +
mag_norm_scale * lora_result * scaling`` broadcasts a ``(out,)`` base output against ``(1, out)``: the result is
``(1, out)``. ``torch.nn.Linear``, the bitsandbytes base layers and PEFT's plain LoRA all return ``(out,)`` for an
``(in,)`` input. Inputs with 2 or more dims keep their shape (the ``(1, out)`` row broadcasts along the batch). The
values are right (the single row is the expected output); only the shape differs, so ``y.sum()`` is the same but a
caller that indexes or stacks the output, or compares it with the base layer's, breaks.

Run: ``python peft_dora_unbatched_input_shape.py``. Exit 1 when the defect reproduces (a DoRA layer's output shape
differs from its base layer's for a 1-D input), 0 when every shape matches. CPU, train mode (no dropout); one forward
per layer (PEFT DoRA on Linear8bitLt loses its int8 scales after the first CPU forward, a separate defect:
``peft_dora_int8_cpu_second_forward.py``).
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft.tuners.lora import bnb as peft_bnb


def base_layer(bits: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(torch.randn(48, 64).half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")  # quantizes


def shapes(bits: int, use_dora: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(base layer's output shape, adapter layer's) for one 1-D input, train mode (the CPU int8 matmul of eval mode
    takes no 1-D input at all; the training path, ``MatMul8bitFp``, does)."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    base_shape = tuple(base_layer(bits).train()(x).shape)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, init_lora_weights=False)
    cls = peft_bnb.Linear4bit if bits == 4 else peft_bnb.Linear8bitLt
    layer = cls(base_layer(bits), "default", config=config, r=4, lora_alpha=8, init_lora_weights=False)
    return base_shape, tuple(layer.train()(x).shape)


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defect = False
    for bits in (4, 8):
        for use_dora in (False, True):
            base_shape, got = shapes(bits, use_dora)
            ok = got == base_shape
            print(f"{bits}-bit {'DoRA' if use_dora else 'LoRA'}: input (64,), base output {base_shape}, "
                  f"adapter output {got}{'' if ok else '  <-- differs'}")
            defect |= not ok
    print("DEFECT: PEFT DoRA turns an unbatched (1-D) input's output into (1, out_features)" if defect
          else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
