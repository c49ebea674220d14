"""Clauses of area ``protocol``: the layer protocol (checks: ``conformance.clauses.protocol.checks``)."""

from conformance.clauses.clause import declare

declare(
    "LAYER-PROTOCOL-SURFACE", "MUST",
    "The adapter layer is an nn.Module exposing forward, merge, get_delta_weight, set_adapter, adapter_parameters, "
    "merged, merged_adapters and base_layer (and unmerge / add_adapter when it declares unmerge / multi_adapter), "
    "starting unmerged over the given bnb layer.",
    source="conformance/clauses/interface.py AdapterLayer (this project's protocol); peft v0.21.2 "
    "src/peft/tuners/tuners_utils.py BaseTunerLayer",
    area="protocol",
)
