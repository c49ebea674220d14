"""Clauses of area ``merge``: merge and unmerge (checks: ``conformance.clauses.merge.checks``).

What a user relies on is a MUST (a merge into a quantized base warns about rounding; a second merge
and an unmerge with nothing merged warn and change nothing); PEFT's exact texts are SHOULDs in area
``wording`` (``conformance.clauses.wording.declare``).
"""

from conformance.clauses.clause import declare

SOURCE_MERGE = ("peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt/Linear4bit merge and unmerge (dequantize, "
                "add the delta, requantize with the original settings); peft v0.21.2 src/peft/utils/integrations.py "
                "dequantize_bnb_weight; peft v0.21.2 src/peft/tuners/oft/layer.py merge/unmerge with "
                "src/peft/utils/quantization_utils.py Bnb4bitBackend (OFT merge = rotate W, unmerge = inverse "
                "rotation; peft v0.16-v0.20 src/peft/tuners/oft/bnb.py)")
CYCLES = 5
ROUNDING_WORDS = ("rounding", "quantiz")

declare(
    "MERGE-FORWARD-BOUND", "MUST",
    "After merge() the layer's output matches the unmerged adapter forward within the analytic bound: one "
    "requantization (weight_bound of the merged layer) plus the merge and matmul rounding (hypothesis over shapes, "
    "ranks, alphas != r, rsLoRA, OFT block sizes/sharing, quant types, blocksizes, double quant, compute dtypes, "
    "storage dtypes; then listed 8-bit bases with has_fp16_weights in train and eval mode, where the merge may add to "
    "the float16 weight or to its int8 form and the bound adds their exact gap), and the merged quant state "
    "dequantizes to the merged weight within that requantization bound. DoRA's merge is not additive: the merged "
    "weight is f (W0 + s B A) with f = m / ||W0 + s B A||_c, the norm of each output row taken on the unmerged "
    "weight (PEFT DoraLinearVariant.merge_safe), with the DoRA bounds of conformance.numerics.dora.",
    source=SOURCE_MERGE,
    area='merge',
)

declare(
    "MERGE-ROUNDTRIP", "MUST",
    "merge() then unmerge() returns the dequantized base weight within the bound of two requantizations plus the "
    "merge/unmerge arithmetic (OFT: unmerge applies the inverse rotation, R^T for the exact Cayley transform; DoRA: "
    "unmerge divides by the very factor m/n the merge used, its norm n kept from the merge as PEFT caches it, since "
    "the merged weight's own norm is another number, then subtracts s B A), and the layer reports merged=False.",
    source=SOURCE_MERGE, requires=["unmerge"],
    area='merge',
)

declare(
    "MERGE-CYCLES", "MUST",
    f"k merge/unmerge cycles (k = 1..{CYCLES}) move the base weight by no more than the sum of the k single-cycle "
    "bounds (the drift does not compound beyond linear growth).",
    source=SOURCE_MERGE, requires=["unmerge"],
    area='merge',
)

declare(
    "MERGE-WARNS-LORA", "MUST",
    "Merging LoRA, or DoRA (a LoRA variant, merged by the same code in PEFT), into a quantized base emits a "
    "UserWarning about rounding (its text names rounding or quantization); PEFT's exact text is "
    "MERGE-WARNS-LORA-TEXT.",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt.merge, Linear4bit.merge (warnings.warn on merge, "
    "before the DoRA variant's merge_safe)",
    methods=["lora", "dora"],
    area='merge',
)

declare(
    "MERGE-WARNS-OFT", "MUST",
    "Merging OFT into a quantized base emits a UserWarning about rounding (its text names rounding or "
    "quantization), as a LoRA merge does.",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py merge (the LoRA warning); peft v0.16-v0.20 "
    "src/peft/tuners/oft/bnb.py Linear4bit.merge docstring ('May introduce rounding errors due to 4-bit precision')",
    methods=["oft"],
    area='merge',
)

declare(
    "MERGE-TWICE-WARNS", "MUST",
    "Merging again when every requested adapter is already merged emits a UserWarning and changes nothing (weights "
    "bit-identical, merged_adapters unchanged); PEFT's exact text is MERGE-TWICE-TEXT.",
    source="peft v0.21.2 src/peft/tuners/tuners_utils.py check_adapters_to_merge",
    area='merge',
)

declare(
    "MERGE-UNMERGE-NOTHING-WARNS", "MUST",
    "unmerge() with nothing merged emits a UserWarning and leaves the base layer bit-identical; PEFT's exact text "
    "is MERGE-UNMERGE-NOTHING-TEXT.",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py unmerge",
    requires=["unmerge"],
    area='merge',
)

declare(
    "MERGE-MULTI", "MUST",
    "merge() with several active adapters merges all of them (merged_adapters lists each once) and the merged "
    "output matches the stacked unmerged forward within the bound of one requantization per adapter. DoRA adapters "
    "do not commute: they merge in the forward's order, f_2 (f_1 (W0 + d_1) + d_2), each norm on the unmerged base "
    "weight W0 the forward reads (PEFT merge_safe: 'The weight norm has to be based on the unmerged weight'), the "
    "intermediate requantization passing through f_2; a norm taken on a W0 recovered from the requantized merged "
    "weight (unmerging the first adapter again, PEFT _unmerged_base_weight) is off by that requantization, which the "
    "bound does not add.",
    source=SOURCE_MERGE + "; peft v0.21.2 src/peft/tuners/tuners_utils.py (merge loops over active adapters); peft v0.21.2 "
    "src/peft/tuners/lora/layer.py _unmerged_base_weight, src/peft/tuners/lora/variants.py DoraLinearVariant",
    requires=["multi_adapter", "additive_adapters", "multi_merge"],
    area='merge',
)

declare(
    "MERGE-SUBSET", "MUST",
    "merge(adapter_names=[...]) merges exactly the named adapters (active or not) and nothing else.",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py merge(adapter_names=...)",
    requires=["multi_adapter"],
    area='merge',
)

declare(
    "MERGE-LORA-BIAS", "MUST",
    "With lora_bias=True, merge adds scaling * b_B to the base bias (the bias is part of B's output, scaled like it), "
    "so the merged output matches the unmerged one also when lora_alpha != r, and the merged layer's output is its "
    "base's (the merged bias added once); fp32/fp16 compute, a bf16-stored base, square and non-square.",
    source="peft v0.21.2 src/peft/tuners/lora/layer.py Linear.merge ('base_layer.bias.data += "
    "self.lora_B[active_adapter].bias * self.scaling'); peft v0.21.2 src/peft/tuners/lora/bnb.py (4/8-bit add b_B "
    "without scaling)",
    methods=["lora"],
    requires=["lora_bias"],
    area='merge',
)

declare(
    "MERGE-KEEPS-QUANT-SETTINGS", "MUST",
    "merge() and unmerge() requantize with the original settings: layer type, quant type, blocksize, double quant, "
    "quant storage, weight dtype and compute dtype (4-bit), has_fp16_weights and threshold (8-bit: the weight's and the "
    "layer's MatmulLtState's) are unchanged "
    "(unmerge() checked when the implementation declares unmerge), on bases stored in fp32/fp16/bf16; the storage "
    "dtypes (packed 4-bit storage, absmax, int8 weight, SCB, the float16 weight of a has_fp16_weights base, bias) are "
    "unchanged and the base stays a valid quantized "
    "layer. Every merge clause checks the base the same way (conformance.quant.validate) after each merge/unmerge.",
    source=SOURCE_MERGE + "; peft v0.16-v0.20 src/peft/tuners/oft/bnb.py Linear4bit.merge ('Re-quantize to 4-bit "
    "with original parameters')",
    tiered=True,
    area='merge',
)
