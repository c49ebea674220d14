"""Clauses of area ``protocol``: the layer protocol (checks: ``conformance.clauses.protocol.checks``)."""

from conformance.clauses.clause import declare

declare(
    "LAYER-PROTOCOL-SURFACE", "MUST",
    "The adapter layer is an nn.Module exposing forward, merge, get_delta_weight, set_adapter, adapter_parameters, "
    "merged, merged_adapters and base_layer (and unmerge / add_adapter when it declares unmerge / multi_adapter), "
    "starting unmerged over the given bnb layer; adapter_parameters(name) holds the method's tensors under their "
    "canonical names (LoRA: lora_A.weight, lora_B.weight; OFT: oft_R.weight; DoRA: LoRA's and "
    "lora_magnitude_vector.weight).",
    source="conformance/clauses/interface.py AdapterLayer (this project's protocol); peft v0.21.2 "
    "src/peft/tuners/tuners_utils.py BaseTunerLayer; "
    "peft v0.21.2 src/peft/tuners/lora/layer.py LoraLayer (lora_magnitude_vector for use_dora)",
    area="protocol",
)
