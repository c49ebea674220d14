"""The initialization table: every LoRA initialization that reads or rewrites the base weight, what it promises on a
quantized base, and the capability an implementation declares it with.

One row per ``Init`` (``TABLE``), standard library only (the torch-free CLI lists it; ``docs/implementing.md``
renders it). A row says:

- ``value``: what the protocol passes as ``AdapterSpec.params["init_lora_weights"]`` (PEFT's own spelling, so PEFT's
  wrapper hands it through unchanged; ``pissa_niter`` is PEFT's fast-SVD form ``pissa_niter_[number of iters]``).
- ``rule``: what the INIT-* clauses hold the result to (``InitRule``).
- ``capability``: the capability an implementation declares the initialization with (``vocabulary.Capability``).
- ``source``: the upstream code and paper.
- ``needs``: what the implementation's own preparation needs besides the base (calibration inputs, a gradient, the
  float weights), "" when nothing.

What an installed PEFT has is found by feature detection in ``conformance.impls.peft_inits``; this table says what
the suite asks for, never what a release has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from conformance.core.vocabulary import Capability, NamedEnum


class Init(NamedEnum):
    """A LoRA initialization that reads the base weight (``AdapterSpec.params['init_lora_weights']``)."""

    PISSA = "pissa"  #: PiSSA (Meng et al., arXiv:2404.02948): the top-r singular triplets into the adapter
    PISSA_NITER = "pissa_niter"  #: PiSSA with ``torch.svd_lowrank`` (PEFT ``pissa_niter_[n]``)
    OLORA = "olora"  #: OLoRA (Buyukakyuz, arXiv:2406.01775): the QR factors' first r columns/rows
    CORDA = "corda"  #: CorDA (Yang et al., arXiv:2406.05223): context-oriented SVD from calibration activations
    LORA_GA = "lora_ga"  #: LoRA-GA (Wang et al., arXiv:2407.05000): SVD of the estimated weight gradient
    LOFTQ = "loftq"  #: LoftQ (Li et al., arXiv:2310.08659): the adapter takes the low-rank part of W - Q(W)


class InitRule(NamedEnum):
    """What an initialization that accepts a quantized base must leave."""

    #: the base becomes the residual ``W - scaling * B A`` requantized with the base's own settings: ``dequant(base') +
    #: scaling * B A`` equals the original dequantized weight within the requantization bound of the residual, and the
    #: output at init equals the original output within the matching forward bound
    RESIDUAL = "residual"
    #: the base stays the quantization ``Q`` of the float weight ``W`` (bit-identical) and ``scaling * B A`` is the
    #: best rank-r fit of ``W - dequant(Q)``: ``||W - dequant(Q) - scaling B A||_F`` at most the truncated SVD's
    #: (Eckart-Young; one LoftQ step with ``Q`` kept is exactly that fit), plus the arithmetic's rounding
    QUANT_ERROR = "quant_error"


@dataclass(frozen=True)
class InitRow:
    init: Init
    value: str
    rule: InitRule
    capability: Capability
    source: str
    needs: str = ""


_PEFT = "peft v0.21.2 src/peft/tuners/lora/layer.py"
TABLE: Mapping[Init, InitRow] = {
    Init.PISSA: InitRow(Init.PISSA, "pissa", InitRule.RESIDUAL, Capability.INIT_PISSA,
                        f"{_PEFT} LoraLayer.pissa_init; Meng et al., arXiv:2404.02948 (PiSSA, QPiSSA on 4-bit bases)"),
    Init.PISSA_NITER: InitRow(Init.PISSA_NITER, "pissa_niter_4", InitRule.RESIDUAL, Capability.INIT_PISSA_NITER,
                              f"{_PEFT} LoraLayer.pissa_init (svd_lowrank, niter=4)"),
    Init.OLORA: InitRow(Init.OLORA, "olora", InitRule.RESIDUAL, Capability.INIT_OLORA,
                        f"{_PEFT} LoraLayer.olora_init (dequantize_module_weight, QR, Params4bit/Int8Params rebuilt); "
                        "Buyukakyuz, arXiv:2406.01775"),
    Init.CORDA: InitRow(Init.CORDA, "corda", InitRule.RESIDUAL, Capability.INIT_CORDA,
                        f"{_PEFT} LoraLayer.corda_init; peft v0.21.2 src/peft/tuners/lora/corda.py preprocess_corda; "
                        "Yang et al., arXiv:2406.05223",
                        needs="calibration inputs run through the layer before the adapter is made (the "
                              "implementation draws them)"),
    Init.LORA_GA: InitRow(Init.LORA_GA, "lora_ga", InitRule.RESIDUAL, Capability.INIT_LORA_GA,
                          f"{_PEFT} LoraLayer.lora_ga_init; peft v0.21.2 src/peft/tuners/lora/loraga.py "
                          "preprocess_loraga; Wang et al., arXiv:2407.05000",
                          needs="a weight gradient estimated by a training step before the adapter is made (the "
                                "implementation runs it)"),
    Init.LOFTQ: InitRow(Init.LOFTQ, "loftq", InitRule.QUANT_ERROR, Capability.INIT_LOFTQ,
                        "peft v0.21.2 src/peft/utils/loftq_utils.py replace_lora_weights_loftq (the path for a model "
                        "already quantized by bitsandbytes); Li et al., arXiv:2310.08659",
                        needs="the float weight the base was quantized from (AdapterSpec.params['loftq_weight'])"),
}

#: the spec parameter that carries LoftQ's float weight (a tensor, shape out x in)
LOFTQ_WEIGHT = "loftq_weight"


def row(init: Init | str) -> InitRow:
    return TABLE[Init(init)]


def of_value(value: object) -> Init | None:
    """The ``Init`` an ``init_lora_weights`` value names (``pissa_niter_7`` is ``pissa_niter``); None for the rest."""
    if not isinstance(value, str):
        return None
    if value.startswith("pissa_niter_"):
        return Init.PISSA_NITER
    try:
        return Init(value)
    except ValueError:
        return None


def check_complete() -> None:
    """Every init has a row and its own capability (called by the test suite)."""
    missing = [i.value for i in Init if i not in TABLE]
    caps = [r.capability for r in TABLE.values()]
    if missing or len(set(caps)) != len(caps):
        raise RuntimeError(f"init table incomplete ({missing}) or capabilities shared ({caps})")
