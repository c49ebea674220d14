"""Clauses of area ``safe_merge``: NaN-guarded safe merge (checks: ``conformance.clauses.safe_merge.checks``).

PEFT's exact error text is a SHOULD (``SAFE-MERGE-NONFINITE-TEXT``, area ``wording``).
"""

from conformance.clauses.clause import declare

SOURCE = ("peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt.merge / Linear4bit.merge (safe_merge: "
          "torch.isfinite(w_data).all() before writing); peft v0.21.2 src/peft/tuners/oft/layer.py merge")

declare(
    "SAFE-MERGE-NONFINITE", "MUST",
    "merge(safe_merge=True) with a NaN/+Inf/-Inf in any adapter tensor (DoRA: A, B and the magnitude vector) raises "
    "ValueError naming the adapter, leaves the base layer bit-identical and merged False.",
    source=SOURCE, requires=["safe_merge"],
    area='safe_merge',
)

declare(
    "SAFE-MERGE-OTHER-ADAPTER", "MUST",
    "After a refused safe merge of a broken adapter, a finite adapter on the same layer still merges (safe_merge="
    "True) into weights within one requantization bound of the original base plus its delta.",
    source=SOURCE,
    requires=["multi_adapter", "safe_merge"],
    area='safe_merge',
)

declare(
    "SAFE-MERGE-FINITE-BIAS", "MUST",
    "merge(safe_merge=True) of a finite LoRA adapter with lora_bias=True succeeds and gives the same base layer as "
    "merge(safe_merge=False) (bit for bit).",
    source=SOURCE + " (PEFT checks the merged bias with `not torch.isfinite(bias_data)` on a vector)",
    methods=["lora"],
    requires=["lora_bias", "safe_merge"],
    area='safe_merge',
)

declare(
    "SAFE-UNSAFE-WARNS", "SHOULD",
    "merge(safe_merge=False) with a non-finite adapter does not corrupt the base silently: it raises, or emits a "
    "warning that names the non-finite values (the generic rounding warning does not count).",
    source=SOURCE + " (PEFT writes the NaNs without a word)",
    area='safe_merge',
)
