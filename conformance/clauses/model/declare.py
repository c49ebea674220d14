"""Clauses of area ``model``: the model-level entry (capability ``model``; checks: ``conformance.clauses.model.checks``).

Tiny random causal LMs built in process (``conformance.tinymodels``), 4-bit (NF4) and 8-bit, LoRA, OFT and DoRA, on
both load paths (``cases.LOAD_PATHS``): quantized at load time from a float checkpoint, and read back from a quantized
checkpoint. A step that raises fails the clause, naming the step. Merged-versus-unmerged logits and greedy tokens are
measurements, not verdicts: no bound through a whole network is derived here.
"""

from conformance.clauses.clause import declare

SOURCE = ("peft v0.21.2 src/peft/mapping_func.py get_peft_model, src/peft/peft_model.py (save_pretrained, "
          "PeftModel.from_pretrained), src/peft/tuners/tuners_utils.py merge_and_unload; transformers 5.x "
          "modeling_utils.py save_pretrained / from_pretrained with a BitsAndBytesConfig "
          "(quantizers/quantizer_bnb_4bit.py, quantizer_bnb_8bit.py); QLoRA arXiv:2305.14314")

declare(
    "MODEL-ATTACH", "MUST",
    "Attaching adapters to the target modules of a quantized model adapts exactly the bitsandbytes layers the targets "
    "name, each over a base with its original validity record, and the model's logits at init equal the base model's: "
    "bit-identical for LoRA (B = 0: its path adds exact zeros); for OFT and DoRA, whose init is the identity up to "
    "rounding, the largest logit difference is reported.",
    source=SOURCE, requires=["model"], area="model",
)

declare(
    "MODEL-MERGE-UNLOAD", "MUST",
    "merge_and_unload() leaves every adapted module a valid bitsandbytes layer with its original validity record "
    "holding the requantization of its merged weight (the layer merge bound: weight_bound of the stored layer plus "
    "the merge arithmetic, conformance.numerics.merge.merge_target), and no adapter module or tensor in the model.",
    source=SOURCE, requires=["model"], area="model",
)

declare(
    "MODEL-SAVE-ADAPTER", "MUST",
    "The adapter saved and loaded onto a freshly loaded base (the same load path) gives logits bit-identical to the "
    "adapted model's.",
    source=SOURCE, requires=["model"], area="model",
)

declare(
    "MODEL-SAVE-MERGED", "MUST",
    "The merged model saved with save_pretrained and read back with from_pretrained has every bitsandbytes layer's "
    "payload and quant state byte-identical, bit-identical logits, and the same greedy tokens.",
    source=SOURCE, requires=["model"], area="model",
)

declare(
    "MODEL-SET-ADAPTER", "MUST",
    "With a second adapter added on the same targets, set_adapter on the model makes exactly one adapter active: the "
    "logits with either one active are bit-identical to those of a freshly loaded base with that adapter alone.",
    source=SOURCE + "; peft v0.21.2 src/peft/peft_model.py PeftModel.add_adapter / set_adapter",
    requires=["model", "multi_adapter"], area="model",
)

declare(
    "MODEL-DISABLE", "MUST",
    "Inside the model's disabled-adapters context the logits are bit-identical to the base model's, and on leaving it "
    "bit-identical to the adapted model's again.",
    source=SOURCE + "; peft v0.21.2 src/peft/peft_model.py PeftModel.disable_adapter (a context manager)",
    requires=["model", "disable_adapters"], area="model",
)

declare(
    "MODEL-DELETE-ADAPTER", "MUST",
    "Deleting the inactive one of two adapters removes its modules and tensors from the model (no parameter, buffer "
    "or module path names it) and leaves the logits of the active one bit-identical.",
    source=SOURCE + "; peft v0.21.2 src/peft/peft_model.py PeftModel.delete_adapter",
    requires=["model", "multi_adapter", "delete_adapter"], area="model",
)

declare(
    "MODEL-DTYPE-MOVE", "MUST",
    "model.to(torch.float16), .half(), .bfloat16() and .float() on the model the entry returns either refuse (raise "
    "TypeError, ValueError or NotImplementedError, every bitsandbytes layer's payload and quant state bit-identical), "
    "as transformers refuses them on a bitsandbytes model, or keep every bitsandbytes layer's payload and quant state "
    "bit for bit and give finite logits. For 4-bit bases stored as uint8, bfloat16 and float32 (quant_storage; "
    "FSDP-QLoRA loads bfloat16) and 8-bit bases. A move transformers itself lets through on the bare model reaches "
    "bitsandbytes' cast of a float payload, listed in xfails/bitsandbytes.ini (float-storage-cast).",
    source=SOURCE + "; transformers 5.25.0 modeling_utils.py PreTrainedModel.to / half / float (the refusals; no "
    "bfloat16 override); peft v0.21.2 src/peft/peft_model.py PeftModel (torch.nn.Module.to, no override); "
    "bitsandbytes 0.50.2 nn/modules.py Params4bit.to",
    requires=["model"], area="model",
)

TRAIN_SOURCE = ("peft v0.21.2 src/peft/utils/other.py prepare_model_for_kbit_training; transformers 5.x "
                "modeling_utils.py gradient_checkpointing_enable / enable_input_require_grads; torch 2.13 "
                "torch/utils/checkpoint.py (use_reentrant); QLoRA arXiv:2305.14314 Sec. 3 (gradient checkpointing)")

declare(
    "MODEL-PREPARE", "MUST",
    "Preparing a quantized model for training (the entry's prepare, then attach) leaves every bitsandbytes layer's "
    "payload and quant state bit-identical and exactly the adapter's tensors trainable; the model's parameter dtypes "
    "after preparation are reported.",
    source=TRAIN_SOURCE, requires=["model", "prepare"], area="model",
)

declare(
    "MODEL-GRAD-CHECKPOINT", "MUST",
    "With gradient checkpointing on (reentrant and non-reentrant), the adapter gradients of a loss on a fixed batch "
    "are bit-identical to those without it on the CPU (the recomputed forward is the same computation), and every "
    "adapter tensor gets a gradient.",
    source=TRAIN_SOURCE, requires=["model", "prepare"], area="model",
)

declare(
    "MODEL-FIRST-STEPS", "MUST",
    "The first optimizer steps (SGD on a fixed batch, non-reentrant gradient checkpointing) give a finite loss and "
    "finite adapter gradients that are not all zero, change the adapter, and leave every bitsandbytes layer "
    "bit-identical; the memory preparation and a step take is reported (resident-set growth; the CUDA peak on CUDA).",
    source=TRAIN_SOURCE, requires=["model", "prepare"], area="model",
)
