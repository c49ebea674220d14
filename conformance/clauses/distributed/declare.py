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
