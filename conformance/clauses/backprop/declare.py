"""Clauses of area ``backprop``: backprop through cloned views (checks: ``conformance.clauses.backprop.checks``)."""

from conformance.clauses.clause import declare

SOURCE = ("peft v0.21.2 src/peft/tuners/lora/bnb.py Linear4bit.forward ('As per Tim Dettmers, for 4bit, we need to "
          "defensively clone here', result = result.clone()); peft v0.21.2 src/peft/tuners/oft/layer.py forward; "
          "peft v0.21.2 src/peft/tuners/lora/dora.py DoraLinearLayer.forward (weight_norm.detach()); "
          "arXiv:2402.09353 section 4.3")

declare(
    "BACKPROP-GRAD-F64", "MUST",
    "Gradients of a loss w.r.t. the input and the adapter parameters (and the output) match a float64 "
    "computation on the dequantized base weight within the rounding bound of the compute dtype, for 4-bit "
    "(nf4, fp4) and 8-bit bases (outlier threshold 0 and 6.0, the latter with inputs holding outlier columns), "
    "fp32/fp16/bf16 compute and storage dtypes, square and non-square, lora_bias, "
    "1-D/2-D/3-D inputs, batch 1 and more, input requiring grad or not; the output has the input's shape (last dim "
    "out_features) and dtype. DoRA: the adapter parameters include the magnitude vector, and the weight norm "
    "||W0 + s B A||_c is a constant of the gradient (detached, as PEFT and the paper's section 4.3 do): gradients "
    "that flow through it fail.",
    source=SOURCE,
    area='backprop',
)

declare(
    "BACKPROP-MIXED-GRAD-F64", "MUST",
    "With adapter_names (one adapter per sample, '__base__' for none), output and gradients match the float64 "
    "per-sample computation within the rounding bound of the compute dtype.",
    source=SOURCE + "; peft v0.21.2 src/peft/tuners/lora/layer.py LoraLayer._mixed_batch_forward",
    requires=["mixed_batch"],
    area='backprop',
)

declare(
    "BACKPROP-NOGRAD-FORWARD", "MUST",
    "Forward under torch.inference_mode() and torch.no_grad() works, returns a tensor that does not require grad "
    "and equals the grad-mode output (within twice the rounding bound: kernels may differ), and a later "
    "grad-mode forward+backward on the same layer still works.",
    source=SOURCE,
    area='backprop',
)
