"""Quantization math for bitsandbytes layers: read/rewrite weights, analytic error bounds."""

from .bounds import (
    gamma,
    matmul_rounding_bound,
    max_code_gap,
    output_bound,
    unit_roundoff,
    weight_bound,
)
from .layers import (
    BaseLayerError,
    LayerSnapshot,
    bits_of,
    dequantize,
    make_base_layer,
    quant_settings,
    requantize,
    snapshot,
)

__all__ = [
    "BaseLayerError", "LayerSnapshot", "bits_of", "dequantize", "gamma", "make_base_layer", "matmul_rounding_bound",
    "max_code_gap", "output_bound", "quant_settings", "requantize", "snapshot", "unit_roundoff", "weight_bound",
]
