#!/usr/bin/env python
"""adapters (AdapterHub): merges, resets and deletions on bitsandbytes layers are silent, even when they do nothing.

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found by ``--impl adapters``
(``MERGE-WARNS-LORA``, ``MERGE-TWICE-WARNS``, ``MERGE-UNMERGE-NOTHING-WARNS`` and their ``-TEXT`` clauses,
``SAFE-UNSAFE-WARNS``, ``TWIN-MERGE-WARNS``, ``STATE-INVALID-STEP-SAFE``).

adapters 1.3.0 ``src/adapters/methods/lora.py``: ``LoRALinear4bit.merge_adapter`` rounds the merged weight into
4 bits without a warning; a second ``merge_adapter`` of the merged name returns (``# already merged``);
``reset_adapter`` with nothing merged does nothing; ``src/adapters/model_mixin.py`` ``merge_adapter(name)`` visits
only the layers whose ``loras`` hold ``name`` (an unknown name: nothing, no error) and ``delete_adapter`` of an
unknown name only logs at INFO ("No adapter '%s' found for deletion. Skipping."). A non-finite adapter merges
without a word either. Each call below is checked for a warning or an exception.

Run: ``python adapters_merge_silent.py`` (CPU). Exit 1 while any of them is silent, 0 when each warns or raises.
"""

import sys
import warnings
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
    model.add_adapter("a", config=LoRAConfig(r=4, alpha=16, selfattn_lora=False, intermediate_lora=True))
    model.train_adapter("a")
    return model


def base4() -> torch.nn.Module:
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4")
    base.support_avx512bf16_for_cpu = False
    return base.to("cpu")


def silent(what: str, fn) -> str | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - raising is an answer too
            print(f"{what}: raised {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            return None
    caught = [w for w in caught if issubclass(w.category, UserWarning)]
    print(f"{what}: {len(caught)} UserWarning(s) {[str(w.message)[:80] for w in caught]}")
    return None if caught else what


def main() -> int:
    print(f"adapters {metadata.version('adapters')}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, cpu")
    torch.manual_seed(0)
    m = model_with(base4())
    lora = m.encoder.layer[0].intermediate.dense.loras["a"]
    with torch.no_grad():
        torch.nn.init.normal_(lora.lora_B, std=0.1)
    problems = [
        silent("reset_adapter() with nothing merged", m.reset_adapter),
        silent("merge_adapter('nope') (unknown name)", lambda: m.merge_adapter("nope")),
        silent("delete_adapter('nope') (unknown name)", lambda: m.delete_adapter("nope")),
        silent("merge_adapter('a') into 4 bits (rounds the delta)", lambda: m.merge_adapter("a")),
        silent("merge_adapter('a') again (already merged)", lambda: m.merge_adapter("a")),
    ]
    m2 = model_with(base4())
    lora2 = m2.encoder.layer[0].intermediate.dense.loras["a"]
    with torch.no_grad():
        lora2.lora_A[0, 0] = float("nan")
    problems.append(silent("merge_adapter('a') with a NaN in lora_A", lambda: m2.merge_adapter("a")))
    problems = [p for p in problems if p]
    for p in problems:
        print("REPRODUCED: silent:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
