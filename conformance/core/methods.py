"""The method table: every adapter method the TWIN-* clauses judge, its minimal valid config and its twin rule.

One row per ``Method`` (``TABLE``), standard library only (the torch-free CLI lists it; ``docs/clauses.md`` renders
it). A row says:

- ``config``: the method's minimal valid config, as data (PEFT's own parameter names, ``target_modules`` left out;
  the implementation adds it). For LoRA, OFT and DoRA these are the protocol's parameters
  (``conformance.reference`` config dataclasses), which PEFT's wrapper maps onto its own.
- ``rule``: how a quantized layer is judged against its dense twin (``TwinRule``): the same implementation's same
  method, with the same adapter tensors, over a plain ``nn.Linear`` that holds the dequantized base weight, evaluated
  in float64. The bounds are derived in ``conformance.numerics.twin`` from the rule; ``derivation`` says why the
  method's forward fits the rule (PEFT 0.21.2's formula) and what the bound is made of. No row has a constant.
- ``sampled_training``: why a method's training-mode forward cannot be compared elementwise (it draws noise), or "".

What each PEFT release has is found by feature detection in ``conformance.impls.peft_tuners``; this table says
what the suite asks for, never what a release has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conformance.core.vocabulary import Method, NamedEnum


class TwinRule(NamedEnum):
    """How the forward of a quantized layer is bounded against its dense twin (``conformance.numerics.twin``)."""

    #: ``y = base(x) + x dW^T``: the suite's forward bound of the base matmul, plus the rounding of the adapter term in
    #: the adapter dtype (from ``|x|`` and ``|dW|``, dW the twin's effective delta), plus the output cast and the add
    ADDITIVE = "additive"
    #: ``y = S base(x T)``: the base matmul bound on the transformed input ``x T``, the rounding of ``x T`` and of
    #: ``S`` applied to the output in the adapter dtype, and the transform's own rounding as the dense path computes
    #: it in the adapter dtype (``S`` and ``T`` read off the twin over probe bases; neither depends on the base weight)
    TRANSFORM = "transform"
    #: the method fits neither rule: only the structural checks (create refuses or works, every later step runs, merge
    #: keeps the base's validity record, safe merge refuses non-finite weights); its own oracle, if any, is elsewhere
    STRUCTURAL = "structural"


@dataclass(frozen=True)
class MethodRow:
    """One method: its minimal config, its twin rule and why the rule fits."""

    method: Method
    rule: TwinRule
    #: why the rule fits: the method's forward in PEFT 0.21.2, and what the bound is made of
    derivation: str
    #: PEFT's config class for the method, and the file its bitsandbytes support lives in
    peft_config: str
    peft_source: str
    #: the minimal valid config (PEFT's parameter names; the protocol's for LoRA, OFT, DoRA), ``target_modules`` aside
    config: Mapping[str, Any] = field(default_factory=dict)
    #: non-empty: the training-mode forward draws noise, so only eval-mode forwards are compared (the reason)
    sampled_training: str = ""


_GENERIC = "src/peft/utils/quantization_utils.py (Bnb4bitBackend/Bnb8bitBackend)"

TABLE: Mapping[Method, MethodRow] = {row.method: row for row in (
    MethodRow(Method.LORA, TwinRule.ADDITIVE,
              "y = base(x) + s B(Ax): dW = s BA (peft/tuners/lora/bnb.py)", "LoraConfig",
              "src/peft/tuners/lora/bnb.py", {"r": 4, "lora_alpha": 8}),
    MethodRow(Method.OFT, TwinRule.TRANSFORM,
              "y = base(x R), R block-diagonal Cayley rotations: T = R, S = I (peft/tuners/oft/layer.py Linear.forward "
              "with a quantization backend)", "OFTConfig", _GENERIC, {"r": 8}),
    MethodRow(Method.DORA, TwinRule.STRUCTURAL,
              "y = (m / ||W0 + s BA||_c)(base(x) + s B(Ax)) rescales by a column norm of the dequantized weight: neither "
              "additive nor a fixed transform; its hand oracle (conformance.numerics.dora, FWD-ORACLE) is its yardstick",
              "LoraConfig(use_dora=True)", "src/peft/tuners/lora/bnb.py", {"r": 4, "lora_alpha": 8}),
    MethodRow(Method.ADALORA, TwinRule.ADDITIVE,
              "y = base(x) + (x (A*E)^T B^T) s / ranknum: dW = B (A*E) s / ranknum (peft/tuners/adalora/bnb.py)",
              "AdaLoraConfig", "src/peft/tuners/adalora/bnb.py", {"init_r": 4, "target_r": 2, "total_step": 10}),
    MethodRow(Method.HIRA, TwinRule.ADDITIVE,
              "y = base(x) + x (W0 * BA)^T, the Hadamard product with the dequantized weight: dW = W0 * BA "
              "(peft/tuners/hira/bnb.py)", "HiraConfig", "src/peft/tuners/hira/bnb.py", {"r": 4}),
    MethodRow(Method.IA3, TwinRule.TRANSFORM,
              "y = l * base(x) (bias included) for a module outside feedforward_modules: S = diag(l), T = I "
              "(peft/tuners/ia3/bnb.py)", "IA3Config", "src/peft/tuners/ia3/bnb.py", {"feedforward_modules": []}),
    MethodRow(Method.PVERA, TwinRule.ADDITIVE,
              "eval mode: y = base(x) + lambda_b * (B mu), mu the first half of lambda_d * (A x): dW linear in x "
              "(peft/tuners/pvera/bnb.py)", "PveraConfig", "src/peft/tuners/pvera/bnb.py",
              {"r": 4, "projection_prng_key": 0},
              sampled_training="training mode samples mu + exp(logvar / 2) * eps (the reparametrization), so the "
                               "twins' training forwards draw different noise"),
    MethodRow(Method.RANDLORA, TwinRule.ADDITIVE,
              "y = base(x) + s (x B_scaled^T) A_scaled^T with fixed random bases scaled by lambda, gamma "
              "(peft/tuners/randlora/bnb.py)", "RandLoraConfig", "src/peft/tuners/randlora/bnb.py",
              {"r": 4, "projection_prng_key": 0}),
    MethodRow(Method.ROAD, TwinRule.TRANSFORM,
              "y = R(theta, alpha) base(x): 2x2 scaled rotations of output pairs, S = R, T = I "
              "(peft/tuners/road/bnb.py)", "RoadConfig", "src/peft/tuners/road/bnb.py", {"group_size": 8}),
    MethodRow(Method.BOFT, TwinRule.STRUCTURAL,
              "y = s * (base(x R) - b) + b, R a product of butterfly Cayley rotations and s a per-output scale "
              "(peft/tuners/boft/layer.py Linear.forward with a quantization backend): the bias is taken back out of "
              "the rounded base output before the scale and added again, a cancellation the transform rule (whose S "
              "acts on the bias too) does not model, so the structural checks only until BOFT gets its own "
              "derivation", "BOFTConfig", _GENERIC, {"boft_block_size": 8}),
    MethodRow(Method.MISS, TwinRule.ADDITIVE,
              "y = base(x) + (x summed over blocks of r) miss_block: dW is miss_block tiled over the input "
              "(peft/tuners/miss/layer.py, default init)", "MissConfig", _GENERIC, {"r": 8}),
    MethodRow(Method.SHIRA, TwinRule.ADDITIVE,
              "y = base(x) + x dW^T, dW sparse with a fixed random mask (peft/tuners/shira/layer.py)", "ShiraConfig",
              _GENERIC, {"r": 4, "random_seed": 0}),
    MethodRow(Method.OTHER, TwinRule.STRUCTURAL,
              "each tuner of the installed release outside this table that targets nn.Linear (found by the "
              "implementation: other_methods()), with its own defaults: it refuses a quantized base at creation or "
              "every later step runs (TWIN-CREATE)", "(every other PeftConfig with target_modules)",
              "src/peft/tuners/*", {}),
    MethodRow(Method.VERA, TwinRule.ADDITIVE,
              "y = base(x) + lambda_b * B(lambda_d * A x), A and B shared random projections: dW = diag(lambda_b) B "
              "diag(lambda_d) A (peft/tuners/vera/layer.py)", "VeraConfig", _GENERIC,
              {"r": 8, "projection_prng_key": 0}),
)}


def row(method: str | Method) -> MethodRow:
    """The table row of ``method`` (``KeyError`` naming the rows there are)."""
    try:
        return TABLE[Method(method)]
    except (KeyError, ValueError):
        raise KeyError(f"no method table row for {method!r}; rows: {', '.join(m.value for m in TABLE)}") from None


def check_complete() -> None:
    """Every ``Method`` has a row (called by the test suite)."""
    missing = [m.value for m in Method if m not in TABLE]
    if missing:
        raise RuntimeError(f"methods without a table row: {', '.join(missing)}")
