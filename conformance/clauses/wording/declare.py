"""Clauses of area ``wording``: PEFT's exact user-facing texts (SHOULD; checks: ``conformance.clauses.wording.checks``).

The behaviour users rely on is a MUST elsewhere (MERGE-WARNS-LORA, MERGE-TWICE-WARNS,
MERGE-UNMERGE-NOTHING-WARNS, SAFE-MERGE-NONFINITE); matching PEFT word for word is only a SHOULD, so
a library with its own wording is not failed for it.
"""

from conformance.clauses.clause import declare

#: PEFT v0.21.2's texts, one source of truth for the checks and the reference layers' docs
LORA_MERGE_TEXT = "Merge lora module to {bits}-bit linear may get different generations due to rounding errors."
MERGE_TWICE_TEXT = "All adapters are already merged, nothing to do."
UNMERGE_NOTHING_TEXT = "Already unmerged. Nothing to do."
NAN_TEXT = "NaNs detected in the merged weights. The adapter {adapter} seems to be broken"

declare(
    "MERGE-WARNS-LORA-TEXT", "SHOULD",
    f"The LoRA merge rounding warning is PEFT's text {LORA_MERGE_TEXT.format(bits='{4,8}')!r}, for DoRA too (PEFT "
    "merges DoRA, a LoRA variant, through the same code: 'lora' in the text).",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt.merge (line 100), Linear4bit.merge (line 378)",
    methods=["lora", "dora"],
    area="wording",
)

declare(
    "MERGE-TWICE-TEXT", "SHOULD",
    f"The warning of a merge with every requested adapter already merged is PEFT's text {MERGE_TWICE_TEXT!r}.",
    source="peft v0.21.2 src/peft/tuners/tuners_utils.py check_adapters_to_merge (line 2516)",
    area="wording",
)

declare(
    "MERGE-UNMERGE-NOTHING-TEXT", "SHOULD",
    f"The warning of unmerge() with nothing merged is PEFT's text {UNMERGE_NOTHING_TEXT!r}.",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py unmerge (lines 142, 419); src/peft/tuners/oft/layer.py unmerge",
    requires=["unmerge"],
    area="wording",
)

declare(
    "SAFE-MERGE-NONFINITE-TEXT", "SHOULD",
    f"The ValueError of a refused safe merge carries PEFT's text {NAN_TEXT!r} (adapter without lora_bias).",
    source="peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt.merge (line 119), Linear4bit.merge (line 393); "
    "src/peft/tuners/oft/layer.py merge",
    requires=["safe_merge"],
    area="wording",
)
