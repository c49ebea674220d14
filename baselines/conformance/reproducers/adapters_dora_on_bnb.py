#!/usr/bin/env python
"""adapters (AdapterHub): ``LoRAConfig(use_dora=True)`` cannot be added to a bitsandbytes 4-bit or 8-bit layer.

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found while declaring ``--impl
adapters`` (``dora`` is declared missing with this reason).

adapters 1.3.0 ``src/adapters/methods/lora.py`` ``LoRALayer.add_adapter`` passes ``self.weight.data`` as ``w_o``
and ``LoRA.__init__`` takes ``torch.linalg.norm(w_o, dim=1)`` for the magnitude vector ``m``: on
``LoRALinear4bit``/``LoRALinear8bitLt`` that is the packed uint8 / int8 payload, not the weight, so ``add_adapter``
raises (``linalg.vector_norm: Expected a floating point or complex tensor as input. Got Byte`` / ``Char``). The
forward (``compute_dora_norm(self.weight, ...)``) and ``merge_adapter`` (``dora_merge``) read ``self.weight`` the
same way, so a dequantizing ``add_adapter`` alone would not be enough.

Run: ``python adapters_dora_on_bnb.py`` (CPU). Exit 1 while it reproduces (either base), 0 when both build.
"""

import sys
from importlib import metadata

import adapters
import bitsandbytes as bnb
import torch
import transformers
from adapters import LoRAConfig


def model_with(base: torch.nn.Module) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=2, hidden_size=base.in_features, intermediate_size=base.out_features,
                                  num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=2,
                                  type_vocab_size=1)
    with torch.device("meta"):
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    model.encoder.layer[0].intermediate.dense = base
    adapters.init(model)
    return model


def bases() -> dict[str, torch.nn.Module]:
    w = torch.randn(48, 64) / 8
    b4 = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    b4.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    b4.support_avx512bf16_for_cpu = False
    b8 = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False)
    b8.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
    return {"4-bit": b4.to("cpu"), "8-bit": b8.to("cpu")}


def main() -> int:
    print(f"adapters {metadata.version('adapters')}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, cpu")
    torch.manual_seed(0)
    problems = []
    for label, base in bases().items():
        model = model_with(base)
        try:
            model.add_adapter("d", config=LoRAConfig(r=4, alpha=16, selfattn_lora=False, intermediate_lora=True,
                                                     use_dora=True))
            model.set_active_adapters("d")
            with torch.no_grad():
                model.encoder.layer[0].intermediate.dense(torch.randn(3, 64))
            print(f"{label}: DoRA adapter built and ran")
        except Exception as exc:  # noqa: BLE001 - the failure is what we report
            problems.append(f"{label}: add_adapter(use_dora=True) raises {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]}")
    for p in problems:
        print("REPRODUCED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
