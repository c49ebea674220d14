#!/usr/bin/env python
"""transformers' Trainer skips its compile and not-trainable rules for a quantized model carrying adapters the way
transformers' own adapter integration marks them.

transformers + PEFT + bitsandbytes + torch only, a tiny random Llama built from a config, no download. Found by
TRAINER-REJECT-COMPILED and TRAINER-REJECT-NOT-TRAINABLE (conformance), run against an implementation whose adapters
are injected in place (not a ``PeftModel``).

``Trainer.__init__`` checks a quantized model in ``validate_quantization_for_training`` (``trainer_utils.py``; inline
in ``Trainer.__init__`` in 4.x). Every one of its rules is gated on ``_is_quantized_and_base_model = is_quantized and
not _hf_peft_config_loaded``. ``model.add_adapter(LoraConfig(...))`` (``integrations/peft.py PeftAdapterMixin``, the
documented "adapters in transformers" path) sets ``_hf_peft_config_loaded``, so a 4-bit model with adapters added that
way and then compiled, or whose quantization method says it cannot train (``hf_quantizer.is_trainable`` False), is
accepted. The same model wrapped by ``peft.get_peft_model`` instead is rejected in both cases (the flag stays False
on it and the rules run).

Run: ``python adapter_mark_skips_rules.py``. Exit 1 while a rule is skipped, 0 when both are enforced.
"""

import sys
import tempfile
import warnings

import bitsandbytes as bnb
import peft
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def accepted(model: torch.nn.Module, out: str) -> str:
    try:
        Trainer(model=model, args=TrainingArguments(output_dir=out, use_cpu=True, report_to=[]))
    except ValueError as exc:
        return f"rejected ({exc!s:.70})"
    return "ACCEPTED"


def main() -> int:
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    defects = []
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(f"{root}/float")

        def load() -> torch.nn.Module:
            return LlamaForCausalLM.from_pretrained(f"{root}/float", device_map="cpu",
                                                    quantization_config=BitsAndBytesConfig(load_in_4bit=True))

        def lora() -> peft.LoraConfig:
            return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])

        def in_place() -> torch.nn.Module:
            model = load()
            try:
                model.add_adapter(lora())
            except ValueError as exc:  # transformers 5.25 asks for PEFT >= 0.22, not released yet: do what it does
                print(f"  (model.add_adapter raised {exc!s:.90}; injecting with peft.inject_adapter_in_model and "
                      "setting _hf_peft_config_loaded, as add_adapter does)")
                peft.inject_adapter_in_model(lora(), model)
                model._hf_peft_config_loaded = True
            return model

        def not_trainable(model: torch.nn.Module) -> torch.nn.Module:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            type(inner.hf_quantizer).is_trainable = property(lambda self: False)  # a method that cannot train
            return model

        cases = {
            "model.add_adapter(...); torch.compile(model)": lambda: torch.compile(in_place()),
            "get_peft_model(model); torch.compile(...)": lambda: torch.compile(peft.get_peft_model(load(), lora())),
        }
        for what, build in cases.items():
            verdict = accepted(build(), f"{root}/out")
            print(f"  {what}: {verdict}")
            if verdict == "ACCEPTED":
                defects.append(f"Trainer accepted a compiled quantized model ({what})")
        quantizer = type(load().hf_quantizer)
        original = quantizer.__dict__.get("is_trainable")
        try:
            for what, build in {"model.add_adapter(...), is_trainable False": lambda: not_trainable(in_place()),
                                "get_peft_model(model), is_trainable False":
                                    lambda: not_trainable(peft.get_peft_model(load(), lora()))}.items():
                verdict = accepted(build(), f"{root}/out")
                print(f"  {what}: {verdict}")
                if verdict == "ACCEPTED":
                    defects.append(f"Trainer accepted a model whose quantization method cannot train ({what})")
        finally:
            if original is not None:
                quantizer.is_trainable = original
    for d in defects:
        print("DEFECT", d)
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
