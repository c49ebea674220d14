#!/usr/bin/env python
"""adapters (AdapterHub): ``model.merge_adapter(name)`` on a bitsandbytes 8-bit layer raises (removed bnb API).

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found by ``--impl adapters``
(every clause that merges an 8-bit base).

adapters 1.3.0 ``src/adapters/methods/lora.py`` ``LoRALinear8bitLt.merge_adapter`` (and ``reset_adapter``) read the
int8 weight through ``src/adapters/methods/utils.py`` ``dequantize_bnb_weight``, which multiplies an identity matrix
through ``bnb.functional.double_quant`` / ``transform`` / ``igemmlt`` / ``mm_dequant``: the pre-0.45 bitsandbytes
API, gone from bitsandbytes 0.45 on (``AttributeError: module 'bitsandbytes.functional' has no attribute
'double_quant'``). adapters 1.3.0 declares no bitsandbytes pin; every current bitsandbytes (0.50.2 here) fails.
The layer is left unmerged (``merged`` stays falsy), so nothing is corrupted, but an 8-bit LoRA cannot be merged.

Run: ``python adapters_merge_8bit_removed_api.py`` (CPU). Exit 1 while it reproduces, 0 when the merge works and
the merged forward matches the unmerged one.
"""

import sys
from importlib import metadata

import adapters
import bitsandbytes as bnb
import torch
import transformers
from adapters import LoRAConfig


def model_with(base: torch.nn.Module) -> torch.nn.Module:
    """A one-layer BERT (meta device, no download) with ``base`` at the linear intermediate_lora targets."""
    cfg = transformers.BertConfig(vocab_size=2, hidden_size=base.in_features, intermediate_size=base.out_features,
                                  num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=2,
                                  type_vocab_size=1)
    with torch.device("meta"):
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    model.encoder.layer[0].intermediate.dense = base
    adapters.init(model)  # rebuilds the layer as adapters' LoRALinear8bitLt(LoRALinear, Linear8bitLt)
    return model


def main() -> int:
    print(f"adapters {metadata.version('adapters')}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, cpu")
    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=0.0)
    base.weight = bnb.nn.Int8Params((torch.randn(48, 64) / 8).half(), requires_grad=False, has_fp16_weights=False)
    base = base.to("cpu")  # quantizes to int8
    model = model_with(base)
    model.add_adapter("a", config=LoRAConfig(r=4, alpha=16, selfattn_lora=False, intermediate_lora=True))
    model.train_adapter("a")
    layer = model.encoder.layer[0].intermediate.dense
    print(f"layer {type(layer).__name__}, weight {tuple(layer.weight.shape)} {layer.weight.dtype}")
    with torch.no_grad():
        torch.nn.init.normal_(layer.loras["a"].lora_B, std=0.1)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_unmerged = layer(x)
    problems = []
    try:
        model.merge_adapter("a")
        with torch.no_grad():
            err = (layer(x) - y_unmerged).abs().max().item()
        print(f"merged={layer.merged!r}; merged forward vs unmerged: max |diff| {err:.3g}")
        if not err < 0.1:
            problems.append(f"merged forward differs from the unmerged one by {err:.3g}")
    except Exception as exc:  # noqa: BLE001 - the failure is what we report
        problems.append(f"merge_adapter raises {type(exc).__name__}: {str(exc).splitlines()[0]}")
        print(f"after the failed merge: merged={layer.merged!r}, weight {layer.weight.dtype}")
    for p in problems:
        print("REPRODUCED:", p)
    if not problems:
        print("not reproduced: the 8-bit merge works")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
