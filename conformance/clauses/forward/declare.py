"""Clauses of area ``forward``: the unmerged forward (checks: ``conformance.clauses.forward.checks``)."""

from conformance.clauses.clause import declare

declare(
    "FWD-INIT-IDENTITY", "MUST",
    "Default initialisation leaves the base output unchanged within its bound, for every quant type, double quant "
    "setting and compute dtype: bit-identical where the adapter path is exactly zero (LoRA B = 0, OFT R = I: the "
    "output is bit-for-bit the base layer's), which DoRA's (m/||W0||_c - 1) term is not: DoRA starts with s B A = 0 "
    "exactly and the magnitude m the row norms ||W0||_c (within the bound of computing them), and its output is "
    "within the oracle bound of its (m/n - 1) W0 x term (the forward recomputes the norm n), not necessarily "
    "bit-identical.",
    source="peft v0.21.2 src/peft/tuners/lora/layer.py reset_lora_parameters (init_lora_weights=True zeros B); "
    "peft v0.21.2 src/peft/tuners/oft/layer.py reset_oft_parameters (init_weights=True gives R = I); OFT paper "
    "arXiv:2306.07280; peft v0.21.2 src/peft/tuners/lora/dora.py DoraLinearLayer.update_layer (magnitude = weight "
    "norm) and forward (the norm recomputed); DoRA paper arXiv:2402.09353; conformance/numerics/dora.py (bounds)",
    tiered=True,
    area='forward',
)

declare(
    "FWD-ORACLE", "MUST",
    "The unmerged adapter forward matches the float64 oracle (LoRA: x W^T + b + scaling*(B(Ax) + b_B); OFT: "
    "(x R) W^T + b on the dequantized base weight) within the analytic rounding bound, for NF4/FP4 with and without "
    "double quant and 8-bit, compute dtypes fp32/fp16/bf16 combined with base storage dtypes fp32/fp16/bf16, square and "
    "non-square layers, float quant storages, bitsandbytes' CPU packed layout, the 8-bit outlier threshold (inputs with "
    "outlier columns), every pair of these base-layer settings (all combinations with --slow), lora_bias, 1-D/2-D/3-D inputs (8-bit: train and eval mode, int8 storage and has_fp16_weights); the output has the input's "
    "leading dims, out_features and the input's dtype.",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py forward; src/peft/tuners/oft/layer.py forward; OFT paper arXiv:2306.07280; "
    "conformance/numerics/expected.py (error model)",
    tiered=True,
    area='forward',
)

declare(
    "FWD-LORA-DELTA", "MUST",
    "LoRA get_delta_weight(name) equals scaling * B @ A with scaling = lora_alpha / r (rsLoRA: lora_alpha / "
    "sqrt(r)) within the rounding bound of computing it in the adapter dtype. DoRA too: its get_delta_weight is the "
    "low-rank delta s B A alone (the magnitude rescales it only in merge and forward).",
    source="peft v0.21.2 src/peft/tuners/lora/layer.py (update_layer scaling, get_delta_weight); "
    "src/peft/tuners/lora/bnb.py Linear8bitLt/Linear4bit get_delta_weight (the same with use_dora; "
    "src/peft/tuners/lora/variants.py DoraLinearVariant.merge_safe scales it by m/||W + delta||_c); rsLoRA "
    "arXiv:2312.03732",
    methods=["lora", "dora"],
    area='forward',
)

declare(
    "FWD-MIXED-BATCH", "MUST",
    "A mixed-batch forward (adapter_names, one name per sample, '__base__' = no adapter) gives each sample what a "
    "single-adapter forward (or the base layer) gives it, within the oracle bounds of both.",
    source="peft v0.21.2 src/peft/tuners/lora/layer.py _mixed_batch_forward; peft docs 'Inference with different LoRA adapters in "
    "the same batch'",
    requires=["mixed_batch", "multi_adapter"],
    area='forward',
)

declare(
    "FWD-DISABLED", "MUST",
    "With adapters disabled (enable_adapters(False)) the layer returns exactly the base layer's output; "
    "enabling them again restores the adapter output.",
    source="peft v0.21.2 src/peft/tuners/tuners_utils.py BaseTunerLayer.enable_adapters; src/peft/tuners/lora/bnb.py "
    "forward "
    "(disable_adapters branch)",
    requires=["disable_adapters"],
    area='forward',
)

declare(
    "FWD-ERR-SHAPE", "MUST",
    "An input whose last dimension is not in_features raises an error naming the mismatching size (never a "
    "silent broadcast or a wrong-shaped output).",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py forward (delegates to the bnb matmul, which rejects the shapes)",
    area='forward',
)

declare(
    "FWD-ERR-ADAPTER-NAME", "MUST",
    "A mixed-batch forward naming an adapter the layer does not have raises ValueError (or KeyError) naming it; "
    "it is never silently treated as the base model.",
    source="peft v0.21.2 src/peft/peft_model.py _check_forward_args ('Trying to infer with non-existing adapter(s)')",
    requires=["mixed_batch"],
    area='forward',
)

declare(
    "FWD-ERR-RANK", "MUST",
    "LoRA (and DoRA) with r <= 0 is refused with a ValueError that names r.",
    source="peft v0.21.2 src/peft/tuners/lora/layer.py update_layer ('`r` should be a positive integer value'; "
    "use_dora goes through the same update_layer)",
    methods=["lora", "dora"],
    area='forward',
)

declare(
    "FWD-ERR-OFT-LAYOUT", "SHOULD",
    "An OFT r (number of blocks) or oft_block_size that does not divide in_features is refused with a ValueError "
    "naming the value, instead of being silently adjusted.",
    source="peft v0.21.2 src/peft/tuners/oft/layer.py update_layer (PEFT adjusts r/oft_block_size with a warning instead); "
    "conformance/reference/oft.py OftConfig.layout",
    methods=["oft"],
    area='forward',
)
