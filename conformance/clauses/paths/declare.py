"""Clauses of area ``paths``: a layer used the way users use it, step after step, on the bases users get
(checks: ``conformance.clauses.paths.checks``)."""

from conformance.clauses.clause import declare

declare(
    "PATH-SEQUENCE", "MUST",
    "On one adapter layer, in this order: two eval-mode forwards under torch.no_grad(), one under "
    "torch.inference_mode(), a train-mode forward and backward (input without grad, then with grad), a LoRA delta "
    "read, merge(), an eval-mode forward of the merged layer, unmerge() and a last eval-mode forward: every output "
    "matches the oracle of the base as bitsandbytes holds it at that step, every merged weight the merge target "
    "within one requantization, every gradient is finite. The bases include bitsandbytes' CPU packed layout (on "
    "CPUs with AVX512-BF16 a Linear4bit repacks on its first eval-mode forward whose input needs no grad, and "
    "dequantize_4bit of the packed weight is garbage) as well as the standard one; every step runs even after an "
    "earlier one failed; steps bitsandbytes itself fails are listed in xfails/bitsandbytes.ini.",
    source="bitsandbytes 0.50.2 nn/modules.py Linear4bit.forward (support_avx512bf16_for_cpu, "
    "_convert_weight_packed_for_cpu on the first eval no-grad forward) and autograd/_functions.py matmul_4bit "
    "(packing_format_for_cpu branch); peft v0.21.2 src/peft/utils/integrations.py dequantize_bnb_weight (reads "
    "weight.data with dequantize_4bit); peft v0.21.2 tests/test_quantization.py test_merge_unmerge_unload (skips "
    "4-bit merge on the CPU); conformance/quant/layers.py standard_layout",
    area="paths",
)
