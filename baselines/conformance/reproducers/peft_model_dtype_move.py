#!/usr/bin/env python
"""``PeftModel.to(dtype)`` / ``.half()`` / ``.float()`` cast a bitsandbytes model that transformers refuses to cast.

torch + bitsandbytes + transformers + PEFT, no conformance import, a tiny random Llama built from a config, no
download. Found by MODEL-DTYPE-MOVE (PEFT 35). transformers refuses to cast a bitsandbytes model
(``PreTrainedModel.to(dtype)``, ``.half()``, ``.float()`` raise ValueError). ``peft.get_peft_model`` returns a
``PeftModel``, an ``nn.Module`` that does not override those methods, so the same calls on it go through
``nn.Module._apply`` and cast every floating tensor, the 4-bit payload included when it is stored as a float
(``bnb_4bit_quant_storage=torch.bfloat16`` or ``float32``, as FSDP-QLoRA loads): the packed bytes change in every
4-bit layer. With bfloat16 storage and ``.to(torch.float16)`` the model still runs and returns other logits (silently
wrong); with float32 storage the forward raises. uint8 storage (the default) and 8-bit bases are left alone.
(``.bfloat16()`` is not refused by transformers on the bare model either: that one is bitsandbytes' float-storage
cast, xfails/bitsandbytes.ini, not this.)

Run: ``python peft_model_dtype_move.py``. Exit 1 while a wrapper cast changes a payload the bare model protects.
"""

import sys
import tempfile
import warnings

import bitsandbytes as bnb
import peft
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def payload(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().reshape(-1).view(torch.uint8).clone() for n, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)}


def main() -> int:
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    defects = []
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(root)
        for storage in (torch.uint8, torch.bfloat16, torch.float32):
            for name, move in {"to(torch.float16)": lambda m: m.to(torch.float16), "half()": lambda m: m.half(),
                               "float()": lambda m: m.float()}.items():
                def load() -> torch.nn.Module:
                    return LlamaForCausalLM.from_pretrained(root, device_map="cpu", dtype=torch.float32,
                                                            quantization_config=BitsAndBytesConfig(
                                                                load_in_4bit=True, bnb_4bit_quant_storage=storage))
                try:
                    move(load())
                    bare = "cast"
                except ValueError:
                    bare = "refused"
                model = peft.get_peft_model(load(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
                with torch.no_grad():
                    y0 = model(input_ids=ids).logits
                before = payload(model)
                move(model)
                after = payload(model)
                changed = sum(not torch.equal(before[n], after[n]) for n in before)
                try:
                    with torch.no_grad():
                        y = model(input_ids=ids).logits.float()
                    run = f"logits max |diff| {float((y - y0).abs().max()):.3g}"
                except RuntimeError as exc:
                    run = f"forward raised RuntimeError: {exc!s:.60}"
                line = (f"quant_storage {str(storage).removeprefix('torch.'):8s} bare model.{name}: {bare}; "
                        f"PeftModel.{name}: {changed} of {len(before)} 4-bit payloads changed, {run}")
                print(" ", line)
                if bare == "refused" and changed:
                    defects.append(line)
    for d in defects:
        print("DEFECT", d)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
