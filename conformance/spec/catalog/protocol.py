"""Clauses of area ``protocol``: the layer protocol (checks: ``conformance.spec.checks.protocol``)."""

from conformance.spec.clauses import declare

declare(
    "LAYER-PROTOCOL-SURFACE", "MUST",
    "The adapter layer is an nn.Module exposing forward, merge, unmerge, get_delta_weight, add_adapter, set_adapter, "
    "adapter_parameters, merged, merged_adapters and base_layer, starting unmerged over the given bnb layer.",
    source="conformance/spec/implementation.py (protocol); peft/tuners/tuners_utils.py BaseTunerLayer",
    area="protocol",)
