"""Clauses of area ``init``: LoRA initializations that read or rewrite a quantized base (checks:
``conformance.clauses.init.checks``).

PiSSA, OLoRA, CorDA and LoRA-GA move the top of the weight into the adapter and leave the residual in the base; on a
4-bit or 8-bit base that means dequantize, decompose, requantize the residual with the base's own settings. LoftQ
leaves the base and fits the adapter to its quantization error. Each initialization an implementation declares
(capabilities ``init_*``, ``conformance.core.inits.TABLE``) runs over every base axis (``cases.BASES``: each 4-bit
``quant_storage``, a non-default blocksize, a bfloat16 checkpoint dtype, 8-bit with and without outliers and float16
weights, bitsandbytes' CPU packed layout, a base that ran an eval-mode forward first). Each clause reports its outcomes
per initialization and bit width.
"""

from conformance.clauses.clause import declare

SOURCE = ("peft v0.21.2 src/peft/tuners/lora/layer.py (LoraLayer.pissa_init, olora_init, corda_init, lora_ga_init), "
          "src/peft/tuners/lora/corda.py, src/peft/tuners/lora/loraga.py, src/peft/utils/loftq_utils.py "
          "(replace_lora_weights_loftq); Meng et al. arXiv:2404.02948 (PiSSA, QPiSSA: requantize the residual); "
          "Li et al. arXiv:2310.08659 (LoftQ)")

declare(
    "INIT-CREATE", "MUST",
    "Each declared initialization on each base axis either refuses at creation (ValueError, TypeError or "
    "NotImplementedError) with the base bit-identical, or leaves a valid quantized base with its original validity "
    "record (4-bit: quant type, blocksize, double quant, quant_storage, the dtype it was quantized from, stored "
    "dtypes; 8-bit: has_fp16_weights, the threshold and state settings, stored dtypes) whose eval-mode forward runs "
    "and is finite. Any other exception, at creation or at the first forward, fails.",
    source=SOURCE, methods=["lora"], area="init",
)

declare(
    "INIT-NAMES", "SHOULD",
    "A refusal names its cause: the quantized layer type (Linear4bit, Linear8bitLt), bitsandbytes or quantization.",
    source=SOURCE, methods=["lora"], area="init",
)

declare(
    "INIT-RESIDUAL", "MUST",
    "An initialization that rewrites the base (PiSSA, OLoRA, CorDA, LoRA-GA) leaves dequant(base) + scaling * B A "
    "within the requantization bound of the residual (weight_bound of the stored base, plus the rounding of "
    "scaling * B A and of the subtraction in float32) of the original dequantized weight. LoftQ (one step, the base "
    "kept) leaves the base bit-identical and scaling * B A the best rank-r fit of the quantization error: "
    "||W - dequant(base) - scaling * B A||_F no larger than the truncated SVD's (Eckart-Young) plus the same "
    "rounding, W the float weight the base was quantized from.",
    source=SOURCE, methods=["lora"], area="init",
)

declare(
    "INIT-OUTPUT", "MUST",
    "After an initialization that rewrites the base, the layer's eval-mode output (the first and the second no-grad "
    "forward: bitsandbytes' CPU packed layout repacks at the first) equals the original base's output within the "
    "matching forward bound: the LoRA forward bound of the new layer, plus the residual bound of INIT-RESIDUAL "
    "carried through the input, plus the forward bound of the original base.",
    source=SOURCE, methods=["lora"], area="init",
)
