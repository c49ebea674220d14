#!/usr/bin/env python
"""adapters (AdapterHub): ``model.merge_adapter(name)`` on a bitsandbytes 4-bit layer leaves a dense, unquantized weight.

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found by ``--impl adapters``
(``MERGE-*``, ``STATE-*``: every clause that merges a 4-bit base).

adapters 1.3.0 ``src/adapters/methods/lora.py`` ``LoRALinear4bit.merge_adapter`` dequantizes, adds
``delta_w * scaling`` and builds ``Params4bit(merged_weight.to("cpu"), requires_grad=False, **self.weight.__dict__)``
then ``.to(self.weight.device)``. ``weight.__dict__`` carries ``bnb_quantized=True`` and the pre-merge
``quant_state``, so ``Params4bit.to`` never calls ``_quantize``: the layer keeps a dense (out x in) float32 weight
that claims to be quantized. The merged forward raises (``gemm_4bit`` reads the dense tensor as packed bytes), and
``model.reset_adapter()`` raises too (``dequantize_4bit`` of the dense tensor): once merged, the layer can neither
run nor be unmerged. The same ``Params4bit(..., **weight.__dict__)`` pattern as LitGPT 0.5.13 (LitGPT finding 1).

Run: ``python adapters_merge_4bit_not_requantized.py`` (CPU). Exit 1 while it reproduces, 0 when the merge
requantizes, the merged forward matches the unmerged one and the reset restores the base.
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
    adapters.init(model)  # rebuilds the layer as adapters' LoRALinear4bit(LoRALinear, Linear4bit)
    return model


def main() -> int:
    print(f"adapters {metadata.version('adapters')}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, cpu")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(48, 64) / 8, requires_grad=False, quant_type="nf4")
    base.support_avx512bf16_for_cpu = False  # bnb's CPU-only repacking is another matter
    base = base.to("cpu")  # quantizes
    model = model_with(base)
    model.add_adapter("a", config=LoRAConfig(r=4, alpha=16, selfattn_lora=False, intermediate_lora=True))
    model.train_adapter("a")
    layer = model.encoder.layer[0].intermediate.dense
    print(f"layer {type(layer).__name__}, weight {tuple(layer.weight.shape)} {layer.weight.dtype}")
    with torch.no_grad():
        torch.nn.init.normal_(layer.loras["a"].lora_B, std=0.1)  # a trained (non-zero) B
    layer.eval()
    x = torch.randn(3, 64)
    packed = tuple(layer.weight.shape)
    with torch.no_grad():
        y_unmerged = layer(x)
    model.merge_adapter("a")
    w = layer.weight
    print(f"after merge_adapter: merged={layer.merged!r}, weight {type(w).__name__} {tuple(w.shape)} {w.dtype}, "
          f"bnb_quantized={getattr(w, 'bnb_quantized', None)}")
    problems = []
    if w.dtype != torch.uint8 or tuple(w.shape) != packed:
        problems.append(f"merged weight is dense {tuple(w.shape)} {w.dtype}, not packed {packed} uint8")
    try:
        with torch.no_grad():
            err = (layer(x) - y_unmerged).abs().max().item()
        print(f"merged forward vs unmerged: max |diff| {err:.3g}")
        if not err < 0.1:
            problems.append(f"merged forward differs from the unmerged one by {err:.3g}")
    except Exception as exc:  # noqa: BLE001 - the failure is what we report
        problems.append(f"merged forward raises {type(exc).__name__}: {str(exc).splitlines()[0]}")
    try:
        model.reset_adapter()
        with torch.no_grad():
            err = (layer(x) - y_unmerged).abs().max().item()
        print(f"after reset_adapter: forward vs the unmerged one: max |diff| {err:.3g}")
        if not err < 0.1:
            problems.append(f"forward after reset_adapter differs by {err:.3g}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"reset_adapter raises {type(exc).__name__}: {str(exc).splitlines()[0]}")
    for p in problems:
        print("REPRODUCED:", p)
    if not problems:
        print("not reproduced: merge requantized, the merged forward matches, reset restores")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
