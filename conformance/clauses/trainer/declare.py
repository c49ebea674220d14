"""Clauses of area ``trainer``: transformers Trainer rules (checks: ``conformance.clauses.trainer.checks``)."""

from conformance.clauses.clause import declare

SOURCE = (
    "transformers v4.x src/transformers/trainer.py:500-529 Trainer.__init__ (quantized-model checks, moved later to) "
    "transformers 5.23.0 trainer_utils.py:102-142 validate_quantization_for_training, "
    "called from trainer.py:456 (Trainer.__init__)"
)

declare(
    "TRAINER-REJECT-PURELY-QUANTIZED", "MUST",
    "Trainer rejects a bitsandbytes-quantized model without trainable adapters with a ValueError that says "
    "it cannot fine-tune purely quantized models.",
    source=SOURCE, requires=["model"], devices=["cpu"],
    area='trainer',
)

declare(
    "TRAINER-PEFT-TRAINS", "MUST",
    "Trainer accepts a quantized model with LoRA/OFT/DoRA adapters attached by the implementation's model entry "
    "(peft.get_peft_model for PEFT) and a few steps on a "
    "fixed batch give finite, falling loss, change only adapter parameters and leave every bitsandbytes "
    "layer bit-identical; with DoRA every magnitude vector is trainable and changes in the first step.",
    source=SOURCE + "; QLoRA arXiv:2305.14314 (4-bit base + LoRA set-up); https://huggingface.co/docs/transformers/peft"
                    "; DoRA arXiv:2402.09353 Sec. 4.1 (trainable magnitude), peft/tuners/lora/dora.py DoraLinearLayer",
    requires=["model"], devices=["cpu"],
    area='trainer',
)

declare(
    "TRAINER-EVAL-THEN-TRAIN", "MUST",
    "Evaluating during training (eval_strategy='steps') leaves the quantized weights bit-identical and the "
    "adapters learning: every later step has a non-zero finite gradient norm and the loss still falls.",
    source="https://huggingface.co/docs/transformers/peft (quantized training with adapters); transformers "
           "TrainingArguments.eval_strategy; found here: "
           "bitsandbytes 0.50.2 nn/modules.py:609-620 Linear4bit.forward repacks the weight in place "
           "(_convert_weight_packed_for_cpu) on an eval-mode no-grad CPU forward when AVX512-BF16 is present",
    requires=["model"], devices=["cpu"],
    area='trainer',
)

declare(
    "TRAINER-REJECT-COMPILED", "MUST",
    "Trainer rejects a compiled quantized model, with or without adapters, whichever way it was compiled "
    "(torch.compile(model), model.compile(), compiled submodules, compiling before the adapters are attached).",
    source=SOURCE + " ('You cannot fine-tune quantized model with `torch.compile()`')",
    requires=["model"], devices=["cpu"],
    area='trainer',
)

declare(
    "TRAINER-REJECT-NOT-TRAINABLE", "MUST",
    "Trainer rejects a quantized model (with or without adapters) whose quantization method declares "
    "is_trainable False, naming the method, even when the method is QAT-trainable.",
    source=SOURCE + "; transformers/quantizers/auto.py AUTO_QUANTIZER_MAPPING; quantizer_bnb_8bit.py is_trainable",
    requires=["model"], devices=["cpu"],
    area='trainer',
)

declare(
    "TRAINER-ACCEPT-QAT", "MUST",
    "Trainer accepts a quantized model without adapters when its quantization method is QAT-trainable and "
    "trainable (is_qat_trainable and is_trainable True).",
    source=SOURCE + "; HfQuantizer.is_qat_trainable; "
                    "transformers/quantizers/quantizer_fp_quant.py, quantizer_bitnet.py",
    requires=["model"], devices=["cpu"],
    area='trainer',
)
