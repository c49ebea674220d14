#!/usr/bin/env python
"""adapters (AdapterHub): ``LoRAConfig(r=0)`` / ``r < 0`` are not validated; the error comes from deep inside.

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found by ``FWD-ERR-RANK``
(``--impl adapters``): a rank that is not a positive integer must be refused with a ValueError naming it.

adapters 1.3.0 ``src/adapters/configuration/adapter_config.py`` ``LoRAConfig`` takes any ``r``;
``src/adapters/methods/lora.py`` ``LoRA.__init__`` then builds ``torch.zeros((r, in))`` (r < 0: torch's
"zeros: Dimension size must be non-negative.") and ``self.scaling = self.lora_alpha / self.r`` (r = 0:
``ZeroDivisionError: division by zero``), both at ``model.add_adapter``.

Run: ``python adapters_rank_not_validated.py`` (CPU). Exit 1 while a bad rank gets anything but a ValueError.
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


def main() -> int:
    print(f"adapters {metadata.version('adapters')}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, cpu")
    problems = []
    for r in (0, -2):
        base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4")
        model = model_with(base.to("cpu"))
        try:
            model.add_adapter("a", config=LoRAConfig(r=r, alpha=8, selfattn_lora=False, intermediate_lora=True))
            problems.append(f"r={r}: accepted")
        except ValueError as exc:
            print(f"r={r}: ValueError {exc}")
        except Exception as exc:  # noqa: BLE001 - the failure is what we report
            problems.append(f"r={r}: {type(exc).__name__}: {str(exc).splitlines()[0]} (not a ValueError naming r)")
    for p in problems:
        print("REPRODUCED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
