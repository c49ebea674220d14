#!/usr/bin/env python
"""adapters (AdapterHub): ``model.delete_adapter(name)`` of the merged adapter raises ``KeyError`` half-way.

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found by ``MODEL-MERGE-UNLOAD`` and
``MODEL-SAVE-MERGED`` (``--impl adapters``: adapters has no unload, the entry merges and then deletes each adapter).

adapters 1.3.0 ``src/adapters/model_mixin.py`` ``ModelAdaptersMixin.delete_adapter`` first removes the LoRA modules
from every layer (``LoRALayer.delete_adapter``) and the config entry, then, because the deleted adapter was the active
one, sets ``self.active_adapters = None``, i.e. ``set_active_adapters(None)``, which calls ``reset_adapter()``
first; ``LoRALinear4bit.reset_adapter`` (and ``LoRALinear.reset_adapter``) reads ``self.loras[self.merged]``, the LoRA
just deleted: ``KeyError``. The model is left half-deleted: the adapter is gone from the layers and the config, the
layers still say ``merged == name`` and the active setup still names it (any later ``set_active_adapters`` or
``reset_adapter`` raises the same ``KeyError``). The merged weight cannot be taken back out any more.

Run: ``python adapters_delete_merged_adapter.py`` (CPU). Exit 1 while it reproduces, 0 when the delete works.
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
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4")
    base.support_avx512bf16_for_cpu = False
    model = model_with(base.to("cpu"))
    model.add_adapter("a", config=LoRAConfig(r=4, alpha=16, selfattn_lora=False, intermediate_lora=True))
    model.train_adapter("a")
    layer = model.encoder.layer[0].intermediate.dense
    model.merge_adapter("a")  # (the 4-bit merged weight is itself wrong: adapters_merge_4bit_not_requantized.py)
    problems = []
    try:
        model.delete_adapter("a")
        print("delete_adapter of the merged adapter worked")
    except KeyError as exc:
        problems.append(f"delete_adapter('a') of the merged adapter raises KeyError: {exc}")
    print(f"after: layer.loras {list(layer.loras)}, layer.merged {layer.merged!r}, "
          f"config adapters {list(model.adapters_config.adapters)}, active {model.active_adapters}")
    if "a" not in layer.loras and layer.merged == "a":
        problems.append("the layer is left merged with an adapter it no longer holds")
    for p in problems:
        print("REPRODUCED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
