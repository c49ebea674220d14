#!/usr/bin/env python
"""adapters (AdapterHub): ``AdapterTrainer`` skips every rule ``transformers.Trainer`` applies to quantized models.

Plain torch + bitsandbytes + transformers + adapters, no conformance import. Found by ``TRAINER-REJECT-PURELY-QUANTIZED``,
``TRAINER-REJECT-COMPILED`` and ``TRAINER-REJECT-NOT-TRAINABLE`` (``--impl adapters``, whose model entry names
``AdapterTrainer`` as the trainer its users train with).

adapters 1.3.0 ``src/adapters/trainer.py`` ``AdapterTrainer.__init__`` sets ``model.is_quantized = False`` around
``Trainer.__init__`` (and restores it after). transformers 4.57.6 ``trainer.py`` ``Trainer.__init__`` checks quantized
models only under ``if _is_quantized_and_base_model`` / ``getattr(model, "is_quantized", False)``: a purely quantized
model (no adapter at all), a quantization method that does not support training and a compiled quantized model are
all refused with a ``ValueError`` there. With ``AdapterTrainer`` none is: here a bitsandbytes 4-bit tiny Llama
with no adapter, which ``Trainer`` refuses ("... purely quantized models ..."), is accepted.

Run: ``python adapters_trainer_skips_quantized_rules.py`` (CPU). Exit 1 while it reproduces, 0 when AdapterTrainer
refuses the model as Trainer does.
"""

import sys
import tempfile
from importlib import metadata

import adapters
import bitsandbytes as bnb
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


def quantized_llama(path: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": "cpu"})


def verdict(cls: type, model: torch.nn.Module, out: str) -> str:
    args = TrainingArguments(output_dir=out, max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    try:
        cls(model=model, args=args)
    except ValueError as exc:
        return f"refused: {str(exc).splitlines()[0][:120]}"
    return "accepted"


def main() -> int:
    print(f"adapters {metadata.version('adapters')}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        model = quantized_llama(tmp)
        print(f"model.is_quantized = {model.is_quantized}, trainable parameters: "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad)}")
        plain = verdict(Trainer, model, tmp)
        ours = verdict(adapters.AdapterTrainer, model, tmp)
    print(f"transformers.Trainer, purely quantized model: {plain}")
    print(f"adapters.AdapterTrainer, the same model: {ours}")
    if plain.startswith("refused") and ours == "accepted":
        print("REPRODUCED: AdapterTrainer accepts a purely quantized model that Trainer refuses")
        return 1
    print("not reproduced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
