#!/usr/bin/env python
"""PEFT DoRA on a bitsandbytes ``Linear8bitLt`` on the CPU: the second forward raises (the int8 scales are lost).

Plain torch + bitsandbytes + PEFT, no conformance import. Found by ``suites/test_dora_reference.py`` (PEFT's own DoRA
against the float64 oracle; an eval forward then a train forward on the same layer).

What happens (PEFT 0.21.2, bitsandbytes 0.50.2, CPU): ``Linear8bitLt.forward`` moves the weight's int8 statistics to
its state on the first forward (``init_8bit_state``: ``state.CB = weight.CB``, ``state.SCB = weight.SCB``, then
``weight.CB = weight.SCB = None``). DoRA's forward then reads the base weight through
``peft/utils/integrations.py dequantize_module_weight``, which on the CPU re-wraps it (``module.weight =
module.weight.to(device)``, "dequantize_bnb_weight for 8bit moves the device in-place"); ``Int8Params.to`` gives the
new parameter ``CB = data`` but no ``SCB`` (the old one's is None by now). The next base forward sees ``weight.CB``
set, runs ``init_8bit_state`` again and overwrites ``state.SCB`` with None: the forward raises
``AttributeError: 'NoneType' object has no attribute 'unsqueeze'`` (train mode, ``MatMul8bitFp``) or ``... no
attribute 'dtype'`` (eval mode, the int8 matmul). Plain LoRA on the same layer does not call
``dequantize_module_weight`` in its forward and runs. The re-wrap is guarded by ``is_cpu``, so CUDA should not be
affected (not run there).

Run: ``python peft_dora_int8_cpu_second_forward.py``. Exit 1 when the defect reproduces (the second forward raises or
``state.SCB`` is None after the first), 0 when two forwards in each mode run with the scales kept.
"""

import sys
import warnings

import bitsandbytes as bnb
import peft
import torch
from peft.tuners.lora import bnb as peft_bnb


def base_layer() -> bnb.nn.Linear8bitLt:
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(48, 64).half(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")  # quantizes: weight.CB, weight.SCB


def two_forwards(use_dora: bool, training: bool) -> str | None:
    """None when two forwards run and keep the scales, else what went wrong."""
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora)
    layer = peft_bnb.Linear8bitLt(base_layer(), "default", config=config, r=4, lora_alpha=8).train(training)
    x = torch.randn(3, 64)
    for i in (1, 2):
        try:
            layer(x)
        except Exception as e:  # noqa: BLE001 - the defect is any exception here
            return f"forward {i} raised {type(e).__name__}: {e}"
        if layer.get_base_layer().state.SCB is None:
            cb_set = layer.get_base_layer().weight.CB is not None
            return f"after forward {i}: state.SCB is None, weight.CB set: {cb_set}"
    return None


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, device cpu")
    defect = False
    for use_dora in (False, True):
        for training in (False, True):
            what = two_forwards(use_dora, training)
            name = f"{'DoRA' if use_dora else 'LoRA'} {'train' if training else 'eval'}"
            print(f"{name}: {'ok' if what is None else what}")
            defect |= use_dora and what is not None
    print("DEFECT: PEFT DoRA on Linear8bitLt (CPU) loses the int8 scales after one forward" if defect else "no defect")
    return 1 if defect else 0


if __name__ == "__main__":
    sys.exit(main())
