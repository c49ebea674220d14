#!/usr/bin/env python
"""transformers cannot save a model it read back from a bitsandbytes-quantized checkpoint.

transformers + bitsandbytes + torch only, a tiny random Llama built from a config, no download. Found by
MODEL-SAVE-MERGED (conformance): users load a published 4-bit or 8-bit checkpoint, attach and merge adapters, and
``save_pretrained`` the result; the first and the last step are enough to show it.

A model quantized at load time (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``) saves fine.
Saved and read back (the checkpoint's config carries the quantization config), the same model's ``save_pretrained``
raises a bare ``NotImplementedError`` from ``core_model_loading.py`` (``reverse_transform``: the weight conversion the
load recorded has no reverse op), 4-bit and 8-bit alike.

Run: ``python quantized_checkpoint_resave.py``. Exit 1 while a re-save raises, 0 when every save works.
"""

import sys
import tempfile
import warnings

import bitsandbytes as bnb
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def main() -> int:
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, transformers {transformers.__version__}")
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    defects = []
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(f"{root}/float")
        for bits in (4, 8):
            q = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
            model = LlamaForCausalLM.from_pretrained(f"{root}/float", quantization_config=q, device_map="cpu")
            model.save_pretrained(f"{root}/q{bits}")
            print(f"  {bits}-bit, quantized at load: save_pretrained works")
            back = LlamaForCausalLM.from_pretrained(f"{root}/q{bits}", device_map="cpu")
            try:
                back.save_pretrained(f"{root}/again{bits}")
                print(f"  {bits}-bit, read back from the quantized checkpoint: save_pretrained works")
            except Exception as exc:  # noqa: BLE001
                defects.append(f"{bits}-bit: save_pretrained of a model read back from a quantized checkpoint raised "
                               f"{type(exc).__name__}: {exc!s:.80}")
    for d in defects:
        print("DEFECT", d)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
