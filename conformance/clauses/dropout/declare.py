"""Clauses of area ``dropout``: LoRA and DoRA ``lora_dropout`` and OFT ``module_dropout`` above 0
(checks: ``conformance.clauses.dropout.checks``; the mean bound: ``conformance.numerics.dropout``).

What "no-grad in train mode" means: PEFT applies dropout through modules whose activity follows only
``Module.training`` (``torch.nn.Dropout`` for LoRA, ``MultiplicativeDropoutLayer`` for OFT), so dropout is active in
train mode also under ``torch.no_grad()`` and ``torch.inference_mode()``, and inactive in eval mode whatever the grad
mode. The clauses check exactly that: eval mode (plain, no_grad, inference_mode) gives the bit-identical output of the
dropout-0 layer with the same weights; train mode (grad enabled and no_grad) is active.

DoRA follows PEFT (``peft/tuners/lora/variants.py`` ``DoraLinearVariant.forward``): in eval mode (or without dropout)
the dropout module is not called and the base term is ``base(x) - bias``; in train mode with dropout the magnitude
term is computed on the dropped input, ``W0 x + b + (f - 1) W0 d(x) + f s B A d(x)``, where the paper applies dropout
to the low-rank branch only (``f W0 x + f s B A d(x)``). Both have the same mean, the dropout-free output
(``E[d(x)] = x``), which DROPOUT-TRAIN-MEAN tests; the range of one forward is PEFT's
(``conformance.numerics.dropout``).

The case vocabulary of this area (dropout probability, number of forwards of the mean test) lives here.
"""

from conformance.clauses.clause import declare

#: dropout probability of every case (LoRA lora_dropout, OFT module_dropout): the largest signal per forward
DROPOUT_P = 0.5
#: forwards averaged by DROPOUT-TRAIN-MEAN (Hoeffding half-width ~ 0.17 of one forward's range at 8 x 48 outputs)
MEAN_FORWARDS = 400
#: train-mode forwards DROPOUT-TRAIN-ACTIVE makes per grad mode (each must differ from the dropout-free output)
ACTIVE_FORWARDS = 8
#: the adapters of the dropout cases (dropout added by the checks); OFT: 8 unshared blocks (a shared block,
#: block_share, is never dropped), so int(p * 8) = 4 blocks are the identity in each train-mode forward; DoRA takes
#: LoRA's (``CheckContext.make_layer`` then moves its magnitude off the row norms, ``cases.trained_magnitude``)
LORA_PARAMS = {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}
OFT_PARAMS = {"r": 8, "oft_block_size": 0, "init_weights": False}

SOURCE = ("peft v0.21.2 src/peft/tuners/lora/bnb.py Linear8bitLt/Linear4bit forward "
          "(lora_B(lora_A(dropout(x))) * scaling, dropout = nn.Dropout(lora_dropout)); peft v0.21.2 "
          "src/peft/tuners/lora/layer.py LoraLayer.update_layer; peft v0.21.2 src/peft/tuners/lora/variants.py "
          "DoraLinearVariant.forward; peft v0.21.2 src/peft/tuners/oft/layer.py "
          "MultiplicativeDropoutLayer (module_dropout: int(p * D) blocks become the identity in training)")

declare(
    "DROPOUT-EVAL-EXACT", "MUST",
    f"In eval mode, with dropout {DROPOUT_P} (LoRA and DoRA lora_dropout, OFT module_dropout), the forward is "
    "bit-identical to the forward of the dropout-0 layer with the same weights, plainly, under torch.no_grad() and "
    "under torch.inference_mode(), and lies within the float64 oracle bound.",
    source=SOURCE, requires=["dropout"], area="dropout",
)

declare(
    "DROPOUT-TRAIN-ACTIVE", "MUST",
    f"In train mode, with dropout {DROPOUT_P}, every one of {ACTIVE_FORWARDS} forwards of a dense input differs from "
    "the dropout-free output beyond the oracle bound and two forwards differ from each other, with gradients "
    "enabled and under torch.no_grad() (dropout follows Module.training, as torch.nn.Dropout does).",
    source=SOURCE, requires=["dropout"], area="dropout",
)

declare(
    "DROPOUT-TRAIN-MEAN", "MUST",
    f"In train mode, with dropout {DROPOUT_P}, the mean of {MEAN_FORWARDS} forwards lies within the Hoeffding bound "
    "(Bonferroni over the output elements, false-alarm rate 1e-8 per test) plus the forward rounding bound around the "
    "expected output: the dropout-free output for LoRA (inverted dropout rescales by 1/(1-p)) and for DoRA (PEFT "
    "computes the magnitude term on the dropped input, the paper on the undropped one: both have the dropout-free "
    "mean; the range of one forward is PEFT's), the block-wise mixture (1 - int(pD)/D) rotated + int(pD)/D "
    "unrotated for OFT.",
    source=SOURCE + "; W. Hoeffding, Probability inequalities for sums of bounded random variables, JASA 1963",
    requires=["dropout"], area="dropout",
)
