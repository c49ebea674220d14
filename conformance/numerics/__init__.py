"""Float64 expected values, analytic bounds and observed/bound ratios: every number a clause compares.

Error model (one place for the whole suite):

- the *value* is computed in float64 from what the layer stores: the dequantized base weight
  (``conformance.quant.dequantize``), the base bias, and the adapter's tensors read through the
  protocol (``adapter_parameters``) plus the config parameters the check passed to ``make_layer``;
  OFT rotations come from ``cayley`` (exact float64 Cayley, written independently of the reference);
- the *bound* is the sum of a quantization term (``conformance.quant.weight_bound`` of a layer's
  state, used when a merge requantized the weight; ``requant`` for states nobody can observe) and
  rounding terms for the dtypes the computation runs in (``conformance.quant.matmul_rounding_bound``
  and Higham's ``gamma_n``), propagated through each step with the triangle inequality. Products of
  ``(1 + delta_i)`` are multiplied out rather than truncated to first order, so no slack factor is
  needed on top (see ``rounding.INT8_DEQUANT_ERROR``);
- the *ratio* ``|observed - value| / bound`` comes from ``ratio`` (never NaN: non-finite -> inf,
  0/0 -> 0); a clause passes a comparison when the ratio is at most 1.

How bitsandbytes 0.50 computes a forward (read from its sources; ``expected.linear_expected``):

- ``Linear4bit``: ``x`` cast to ``compute_dtype``, weight dequantized to it, ``linear`` (accumulate
  in >= float32), bias added in ``compute_dtype``, result cast back to the input dtype;
- ``Linear8bitLt`` in training mode on CPU (``MatMul8bitFp``): weight ``CB * (SCB/127)`` in the input
  dtype, ``linear`` in the input dtype;
- ``Linear8bitLt`` in eval mode, or on CUDA (``MatMul8bitLt``): the *input* is quantized row-wise to
  int8 too (``|x - x_q| <= absmax_row/254`` after a float16 cast), int32 accumulation (exact), float32
  dequantization ``A * (row * col) * 6.200124e-05`` (three roundings; the constant is ``1/127**2``
  only to 1.8e-5 relative, ``rounding.INT8_DEQUANT_SCALE_ERROR``), float32 bias add, cast to the input
  dtype;
- ``Linear8bitLt`` with ``has_fp16_weights`` (bitsandbytes' default, LitGPT's int8 training mode): the same two
  paths, with ``CB``/``SCB`` quantized from its float16 weight by the forward itself (``quant.layers.int8_of``;
  cached in ``MatmulLtState`` between eval-mode forwards), so ``quant.dequantize`` is that int8 form.

Modules: ``rounding`` (unit roundoffs, casts), ``ratio`` (THE ratio helper), ``cayley`` (exact
rotations, solve-error bounds, Neumann and COFT bounds), ``blocks`` (OFT block layout), ``expected``
(plain/LoRA/OFT outputs), ``dropout`` (Hoeffding bound on the mean of train-mode forwards), ``merge`` (merge/unmerge targets), ``requant`` (unobservable
requantizations), ``grads`` (outputs and gradients with their bounds).

Imports torch, bitsandbytes and ``conformance.quant`` only: never ``conformance.reference`` (the
yardstick is checked against this, not against itself), ``conformance.spec`` or the harness.
"""

from .blocks import block_diagonal, block_norms, expand_blocks, oft_layout, oft_rotation, rotate_error, rotate_input
from .cayley import (
    cayley_exact,
    coft_bound,
    inverse_rotation_error,
    lu_growth,
    neumann,
    neumann_bound,
    neumann_rounding,
    oft_blocks,
    orthogonality_bound,
    rotation_blocks,
    rotation_error,
    skew,
    solve_error,
)
from .dropout import (
    FALSE_ALARM,
    DropoutMean,
    hoeffding_halfwidth,
    lora_dropout_mean,
    oft_dropout_blocks,
    oft_dropout_mean,
)
from .expected import (
    Expected,
    base_expected,
    base_weights,
    linear_expected,
    lora_delta,
    lora_delta_error,
    lora_expected,
    lora_path,
    lora_scaling,
    lora_tensors,
    oft_expected,
)
from .grads import BASE, GradExpected, LayerState, grad_expected, read_state, refresh_adapters
from .merge import (
    bias_roundtrip_bound,
    lora_merge_error,
    lora_merged_weight,
    merge_target,
    oft_merge_error,
    oft_merged_weight,
    oft_unmerge_error,
    roundtrip_bound,
)
from .methods import dora_layer_expected, layer_expected
from .ratio import compare, max_ratio, observed, ratios, worst
from .requant import hypothetical_requant_bound, requant_bound_from_exact
from .rounding import INT8_DEQUANT_ERROR, INT8_DEQUANT_SCALE_ERROR, U16, U32, U64, cast_error, gamma_n

__all__ = [
    "BASE", "FALSE_ALARM", "DropoutMean", "hoeffding_halfwidth", "lora_dropout_mean", "oft_dropout_blocks",
    "oft_dropout_mean", "INT8_DEQUANT_ERROR", "INT8_DEQUANT_SCALE_ERROR", "U16", "U32", "U64", "Expected", "GradExpected",
    "LayerState", "base_expected", "base_weights", "bias_roundtrip_bound", "block_diagonal", "block_norms",
    "cast_error", "cayley_exact", "dora_layer_expected", "coft_bound", "compare", "expand_blocks", "gamma_n", "grad_expected",
    "hypothetical_requant_bound", "inverse_rotation_error", "layer_expected", "linear_expected", "lora_delta", "lora_delta_error",
    "lora_expected", "lora_merge_error", "lora_merged_weight", "lora_path", "lora_scaling", "lora_tensors", "lu_growth", "max_ratio",
    "merge_target", "neumann", "neumann_bound", "neumann_rounding", "observed", "oft_blocks", "oft_expected",
    "oft_layout", "oft_merge_error", "oft_merged_weight", "oft_rotation", "oft_unmerge_error", "orthogonality_bound", "ratios",
    "read_state", "refresh_adapters", "requant_bound_from_exact", "rotate_error", "rotate_input", "rotation_blocks",
    "rotation_error", "roundtrip_bound", "skew", "solve_error", "worst",
]
