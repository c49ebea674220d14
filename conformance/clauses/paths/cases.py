"""Cases of area ``paths``: base layers for the step sequence, the CPU packed layout drawn pairwise with the
other base axes (``conformance.clauses.cases.pairwise``)."""

from __future__ import annotations

from conformance.clauses import cases

#: shapes bitsandbytes' CPU repack supports (out_features a multiple of 32, in_features of every blocksize)
PACKABLE_SHAPES = ((64, 64), (64, 96))
#: the one listed bitsandbytes failure drawn on purpose: out_features 48 asserts in the repack
REFUSED_SHAPE = (64, 48)

#: methods whose trainable transform of the input comes before the base layer (OFT: x R, then the base; OFT paper
#: arXiv:2306.07280, peft v0.21.2 src/peft/tuners/oft/layer.py forward): in training the base's input requires grad
#: even when the layer's input does not
ROTATES_INPUT = frozenset({"oft"})

#: the steps of PATH-SEQUENCE, in order
STEPS = ("eval no_grad", "eval no_grad again", "eval inference_mode", "train", "train input grad", "delta",
         "merge", "merged eval", "unmerge", "unmerged eval")


def sequence_cases(bits: int) -> list[cases.BaseCase]:
    """4-bit: pairwise over quant type, double quant, compute dtype, storage dtype, layout (packed or standard)
    and a packable shape, plus the refused shape with the layout on; 8-bit (no packed layout): one base per
    compute dtype."""
    if bits == 8:
        return [cases.BaseCase(8, 64, 64, compute_dtype=d) for d in cases.COMPUTE_DTYPES]
    factors = {
        "quant": cases.QUANT_TYPES, "dq": (False, True), "dtype": cases.COMPUTE_DTYPES,
        "stored": cases.STORAGE_DTYPES, "packed": (True, False), "shape": PACKABLE_SHAPES,
    }
    out = [cases.BaseCase(4, *c["shape"], quant_type=c["quant"], double_quant=c["dq"], compute_dtype=c["dtype"],
                          weight_dtype=c["stored"], cpu_packed=c["packed"]) for c in cases.pairwise(factors)]
    return out + [cases.BaseCase(4, *REFUSED_SHAPE, cpu_packed=True)]
