"""Clauses of area ``moves``: dtype casts of an adapter layer (checks: ``conformance.clauses.moves.checks``)."""

from conformance.clauses.clause import declare

declare(
    "MOVE-DTYPE", "MUST",
    "module.to(float16), .half(), .bfloat16() and .float() on an adapter layer either keep the quantized payload, "
    "its quant state (8-bit: its row statistics) bit for bit and give outputs within the forward oracle bound for an "
    "input of the new dtype, or refuse: raise TypeError, ValueError or NotImplementedError from the move itself, "
    "naming the quantized layer or its storage, with the layer left as it was. For 4-bit bases stored as each "
    "quant_storage (uint8, bfloat16, float16, float32) and for 8-bit bases; a cast bitsandbytes itself gets wrong is "
    "listed in xfails/bitsandbytes.ini.",
    source="bitsandbytes 0.50.2 nn/modules.py Params4bit.to (quant_storage; a floating payload is cast like any "
    "tensor) and Int8Params; transformers BitsAndBytesConfig bnb_4bit_quant_storage (FSDP-QLoRA loads with bfloat16); "
    "torch 2.13 torch/nn/modules/module.py Module.to/half/bfloat16/float (_apply casts floating parameters)",
    tiered=True,
    area="moves",
)
