"""Clauses of area ``twin``: each method on a bitsandbytes base against its dense twin (checks:
``conformance.clauses.twin.checks``).

The dense twin is the same implementation's same method, with the same adapter tensors, over a plain ``nn.Linear``
holding the dequantized base weight, in float64. The rules that bound the difference are derived per method in
``conformance.core.methods.TABLE`` and ``conformance.numerics.twin``; a method whose rule is ``structural`` (DoRA,
which has its own oracle) is held to the structural clauses only (TWIN-CREATE, TWIN-SAFE-MERGE).
"""

from conformance.clauses.clause import declare
from conformance.core.methods import TABLE, TwinRule
from conformance.core.vocabulary import Method

SOURCE = ("peft v0.21.2 src/peft/tuners/{adalora,hira,ia3,pvera,randlora,road}/bnb.py (a bnb.py per method) and "
          "src/peft/utils/quantization_utils.py (Bnb4bitBackend/Bnb8bitBackend for boft, miss, oft, shira, vera); "
          "peft v0.21.2 tests/test_quantization.py (the correlation >= 0.9 PEFT asks of quantized methods today)")
ALL = list(Method)
#: the methods with a table row of their own (every method but ``other``, the implementation's other tuners)
TABLED = [m for m in Method if m is not Method.OTHER]
#: methods with a derived twin rule (every rule but ``structural``)
RULED = [m for m, r in TABLE.items() if r.rule is not TwinRule.STRUCTURAL]
ADDITIVE = [m for m, r in TABLE.items() if r.rule is TwinRule.ADDITIVE]

declare(
    "TWIN-CREATE", "MUST",
    "Creating the method on a 4-bit or 8-bit base either refuses at creation (ValueError, TypeError or "
    "NotImplementedError) with the base bit-identical, or every later step runs: forward in eval and train mode, "
    "backward, and, as declared for the method, merge, unmerge and safe merge, each leaving a valid quantized base "
    "with the validity record it had (layer type, quant state, settings, dtypes) and finite outputs of the right "
    "shape. A method that accepts the base and then raises fails, with the step named. The implementation's other "
    "methods (family 'other': e.g. every PEFT tuner of the installed release that targets nn.Linear) are held to "
    "this clause alone, each with its own defaults, merge steps where its layer has a merge of its own.",
    source=SOURCE, methods=ALL, area="twin",
)

declare(
    "TWIN-CREATE-NAMES", "SHOULD",
    "A refusal at creation names its cause: the quantized layer type (Linear4bit, Linear8bitLt), bitsandbytes or "
    "quantization; an error with no message fails.",
    source=SOURCE, methods=ALL, area="twin",
)

declare(
    "TWIN-FORWARD", "MUST",
    "The forward matches the dense twin's within the method's twin-rule bound (conformance.numerics.twin: the base "
    "matmul bound plus the adapter term's or the transforms' rounding), in eval mode (the first and the second "
    "no-grad forward, bitsandbytes' CPU packed layout repacking at the first) and with grad enabled, and in train "
    "mode (a method whose training forward samples noise, PVeRA, in eval mode only), over the base-layer matrix.",
    source=SOURCE, methods=RULED, requires=["dense_twin"], area="twin", tiered=True,
)

declare(
    "TWIN-BACKWARD", "MUST",
    "The input gradient matches the dense twin's within the twin-rule bound of the transposed map "
    "(conformance.numerics.twin input_grad_expected / transform_grad_expected), the adapter tensors that get a "
    "gradient are those that get one on the twin, and for the additive rule each adapter gradient is within the "
    "magnitude-graph bound of the twin's (the twin on absolute values; in float32 or finer, where it is not vacuous).",
    source=SOURCE, methods=RULED, requires=["dense_twin"], area="twin",
)

declare(
    "TWIN-MERGE", "MUST",
    "merge() stores the requantization of the dense twin's merged weight: the dequantized merged weight is within "
    "the stored layer's requantization bound plus the rounding of the merge arithmetic in the adapter dtype (from "
    "the twin rule) of the twin's merged weight, and the bias within its rule's bound of the twin's merged bias.",
    source=SOURCE, methods=RULED, requires=["dense_twin", "merge"], area="twin",
)

declare(
    "TWIN-MERGE-WARNS", "MUST",
    "merge() into a 4-bit or 8-bit base emits a UserWarning about rounding (its text names rounding or "
    "quantization), as the LoRA and OFT merge clauses (MERGE-WARNS-LORA, MERGE-WARNS-OFT) require.",
    source=SOURCE + "; peft v0.21.2 src/peft/tuners/lora/bnb.py merge (the warning each bnb.py repeats)",
    methods=TABLED, requires=["merge"], area="twin",
)

declare(
    "TWIN-UNMERGE", "MUST",
    "merge() then unmerge() returns the dequantized weight within the bound of two requantizations plus the "
    "merge and unmerge arithmetic of the additive rule of the original, and the layer reports merged=False "
    "(transform methods: TWIN-CREATE checks that unmerge runs and keeps a valid base; OFT's round trip is "
    "MERGE-ROUNDTRIP).",
    source=SOURCE, methods=ADDITIVE, requires=["dense_twin", "merge", "unmerge"], area="twin",
)

declare(
    "TWIN-SAFE-MERGE", "MUST",
    "merge(safe_merge=True) with a NaN in every trainable adapter tensor raises ValueError, leaves the base "
    "bit-identical and merged False.",
    source=SOURCE, methods=TABLED, requires=["merge", "safe_merge"], area="twin",
)
