"""Clauses of area ``lifecycle``: states after a merge (disabled, deleted, a subset merged and unmerged, a merge after
an eval-mode forward or a training step) and trainability after set_adapter / add_adapter
(checks: ``conformance.clauses.lifecycle.checks``)."""

from conformance.clauses.clause import declare

SOURCE_TUNER = "peft v0.21.2 src/peft/tuners/tuners_utils.py BaseTunerLayer (enable_adapters, set_adapter, delete_adapter)"
SOURCE_BNB = "peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt/Linear4bit forward, merge, unmerge"
#: learning rate of the SGD step of LIFECYCLE-MERGE-AFTER-STEP (moves the adapter far beyond rounding)
STEP_LR = 0.5

declare(
    "LIFECYCLE-MERGED-DISABLED", "MUST",
    "After merge() then enable_adapters(False), the forward returns the base output without any adapter (the "
    "original dequantized weight within the merge/unmerge round-trip bound), and merged/merged_adapters say "
    "truthfully whether the base still holds the delta; after enable_adapters(True) the forward is the adapter "
    "forward again (merged or unmerged, as the layer reports).",
    source=SOURCE_TUNER + "; " + SOURCE_BNB + " (forward: 'if self.disable_adapters: if self.merged: self.unmerge()')",
    requires=["disable_adapters"], area="lifecycle",
)

declare(
    "LIFECYCLE-MERGED-DELETE", "MUST",
    "delete_adapter(name) of a merged adapter either refuses (raises) without changing anything (base weight "
    "bit-identical, merged_adapters unchanged, the adapter still there) or unmerges it first (the base weight back "
    "within the round-trip bound, the name gone from merged_adapters); deleting it while its delta stays in the "
    "base fails.",
    source=SOURCE_TUNER + "; peft v0.21.2 src/peft/tuners/lora/layer.py LoraLayer (delete_adapter via "
    "BaseTunerLayer)",
    requires=["delete_adapter", "multi_adapter"], area="lifecycle",
)

declare(
    "LIFECYCLE-SUBSET-UNMERGE", "MUST",
    "After merge(adapter_names=[a subset]) then unmerge(), the base weight is back within the round-trip bound, "
    "merged is False, merged_adapters is empty, every adapter's tensors are bit-identical to before, and the active "
    "adapters' forward matches the oracle (the case with two active adapters needs additive_adapters).",
    source=SOURCE_BNB + " (merge(adapter_names=...), unmerge pops merged_adapters)",
    requires=["multi_adapter", "unmerge"], area="lifecycle",
)

declare(
    "LIFECYCLE-MERGE-AFTER-EVAL", "MUST",
    "merge() after eval-mode forwards merges the adapter's current values: the merged output matches the bound of "
    "one requantization of W0 + delta.",
    source=SOURCE_BNB, area="lifecycle",
)

declare(
    "LIFECYCLE-MERGE-AFTER-STEP", "MUST",
    f"merge() after a training step (train-mode forward, backward, a gradient step of {STEP_LR} x max|p| on the "
    "adapter's largest-gradient entries, normalised) merges "
    "the updated adapter (no cached delta): the merged output matches the bound of one requantization of the "
    "updated W0 + delta.",
    source=SOURCE_BNB + "; peft v0.21.2 src/peft/tuners/lora/layer.py get_delta_weight (computed at merge time)",
    area="lifecycle",
)

declare(
    "LIFECYCLE-TRAINABLE", "MUST",
    "After create, add_adapter and set_adapter (one name; several with additive_adapters), exactly the active "
    "adapters' tensors require grad, every other adapter's are frozen, and no base-layer parameter requires grad "
    "(the base's parameters: base_layer's other than the adapters' tensors, which adapter_parameters names).",
    source=SOURCE_TUNER + " set_adapter ('requires_grad_(True)' for the active adapters, False for the others); "
    "peft v0.21.2 src/peft/tuners/lora/layer.py LoraLayer.update_layer (set_adapter(self.active_adapters))",
    requires=["multi_adapter", "active_trainable"], area="lifecycle",
)
