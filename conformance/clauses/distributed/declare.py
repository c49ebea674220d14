"""Clauses of area ``distributed``: data-parallel training (checks: ``conformance.clauses.distributed.checks``)."""

from conformance.clauses.clause import declare

SOURCE = ("torch 2.13 torch/nn/parallel/distributed.py DistributedDataParallel (gradients are all-reduced and "
          "averaged over ranks, so every replica applies the same update; parameters are broadcast from rank 0 at "
          "construction); torch docs 'Distributed Data Parallel' notes; accelerate v1 docs 'Distributed training' "
          "(QLoRA adapters trained under DDP, frozen quantized base)")

declare(
    "DIST-DDP-GRADS-AGREE", "MUST",
    "Under DistributedDataParallel (2 processes; gloo on the CPU, NCCL on 2+ GPUs) over a 2-layer stack of adapter "
    "layers on a quantized base, for 3 SGD steps on each rank's half of a fixed batch: the adapter gradients and "
    "parameters (DoRA: the magnitude vector among them) are bit-identical across ranks at every step, each step's "
    "gradient equals a single-process gradient on the concatenated batch (at the same parameters) within the float32 "
    "accumulation bound, and the base layers' bytes are identical on every rank and unchanged.",
    source=SOURCE,
    requires=["distributed"],
    area="distributed",
    timeout_s=240.0,
)

FSDP2_SOURCE = ("torch 2.13 torch/distributed/fsdp/_fully_shard/_fully_shard.py fully_shard (parameters become DTensors "
                "sharded on dim 0, all-gathered before each forward and resharded after; gradients reduce-scattered and "
                "averaged over ranks; FSDPModule.unshard/reshard); torch 2.13 torch/distributed/checkpoint "
                "(save/load of sharded state dicts); bitsandbytes 0.50.2 bitsandbytes/nn/modules.py "
                "(Linear4bit.quant_state kept on the module and reattached by fix_4bit_weight_quant_state_from_module "
                "when FSDP gathers the weight into a plain tensor; Params4bit quant_storage); transformers "
                "BitsAndBytesConfig(bnb_4bit_quant_storage) and the FSDP-QLoRA recipe (Answer.AI fsdp_qlora; "
                "accelerate v1 docs 'FSDP' with QLoRA: a float quant_storage so the 4-bit payload shards like the "
                "other parameters)")
FSDP2_SCOPE = (" Under torch's FSDP2 (fully_shard on each adapter layer, then on a 2-layer stack of them over quantized "
               "bases; 1 and 2 processes on gloo on the CPU, 1 and every GPU on NCCL with 2 or more), for 4-bit bases "
               "with double quantization in every quant_storage (uint8, bfloat16, float16, float32) and for 8-bit bases "
               "(where fully_shard refuses an 8-bit base with an exception at wrap time, that refusal is the expected "
               "outcome).")

declare(
    "DIST-FSDP2-BASE-KEPT", "MUST",
    "Wrapping and unwrapping keep every base layer's quantized payload and quant state:" + FSDP2_SCOPE
    + " Each rank's shard is its part of the original payload bytes and the payload gathered is those bytes; the quant "
    "state (4-bit: every tensor and setting of the QuantState; 8-bit: SCB) is unchanged where bitsandbytes looks for "
    "it, after wrapping and after unshard() (8-bit: the weight a forward sees still carries the CB and SCB attributes "
    "Linear8bitLt.forward reads); the full state dict of the wrapped model holds every entry the unwrapped layer's "
    "own state dict holds (payload and quant state), byte for byte.",
    source=FSDP2_SOURCE,
    requires=["distributed"],
    area="distributed",
    timeout_s=600.0,
)

declare(
    "DIST-FSDP2-FORWARD", "MUST",
    "The forward of the wrapped model equals the unwrapped model's:" + FSDP2_SCOPE
    + " In a training forward on each rank's rows, every adapter layer's output equals the never-wrapped layer's output "
    "on the same input within twice that layer's forward bound (each is within its bound of the float64 oracle).",
    source=FSDP2_SOURCE,
    requires=["distributed"],
    area="distributed",
    timeout_s=600.0,
)

declare(
    "DIST-FSDP2-GRADS-AGREE", "MUST",
    "Adapter gradients under FSDP2 are those of one process on the full batch:" + FSDP2_SCOPE
    + " After one training step on each rank's rows, the gathered adapter gradients, and the adapter parameters before "
    "and after the SGD step, are bit-identical on every rank; each gradient equals a single-process gradient on the "
    "concatenated batch (at the same parameters) within the float32 accumulation bound (as DIST-DDP-GRADS-AGREE, with "
    "FSDP's reduce-scatter and its divisions counted); each parameter after the step is p - lr * grad.",
    source=FSDP2_SOURCE,
    requires=["distributed"],
    area="distributed",
    timeout_s=600.0,
)

declare(
    "DIST-FSDP2-STATE-DICT", "MUST",
    "A sharded state dict of the adapters round-trips:" + FSDP2_SCOPE
    + " Every adapter tensor (adapter_parameters) is an entry of the wrapped model's state dict (inside the wrapped "
    "module tree); saved with torch.distributed.checkpoint and loaded into a fresh wrapped stack whose adapters were "
    "drawn from another seed, the adapters gathered are bit-identical to those saved, on every rank.",
    source=FSDP2_SOURCE,
    requires=["distributed"],
    area="distributed",
    timeout_s=600.0,
)

declare(
    "DIST-FSDP2-MERGE", "MUST",
    "A merge never reads a sharded weight:" + FSDP2_SCOPE
    + " merge() of each adapter layer of the wrapped, sharded model either refuses with an exception that names the "
    "sharding (shard, DTensor or FSDP in its message) or gives the merged base of the never-wrapped model; after "
    "unshard() of every FSDP module (the full payload in place, its quant state where bitsandbytes keeps it), merge() "
    "gives the same merged base (payload, bias and quant state) as the same merge of the never-wrapped model with the "
    "same adapter tensors, byte for byte.",
    source=FSDP2_SOURCE,
    requires=["distributed"],
    area="distributed",
    timeout_s=600.0,
)
