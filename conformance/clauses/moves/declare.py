"""Clauses of area ``moves``: dtype casts and device moves of an adapter layer (checks: ``conformance.clauses.moves.checks``)."""

from conformance.clauses.clause import declare

declare(
    "MOVE-DTYPE", "MUST",
    "module.to(float16), .half(), .bfloat16() and .float() on an adapter layer either keep the quantized payload, "
    "its quant state (8-bit: its row statistics) bit for bit and give outputs within the forward oracle bound for an "
    "input of the new dtype, or refuse: raise TypeError, ValueError or NotImplementedError from the move itself, "
    "naming the quantized layer or its storage, with the layer left as it was; DoRA's magnitude vector is cast "
    "with the layer (to the new dtype, as every floating parameter). For 4-bit bases stored as each "
    "quant_storage (uint8, bfloat16, float16, float32) and for 8-bit bases; a cast bitsandbytes itself gets wrong is "
    "listed in xfails/bitsandbytes.ini.",
    source="bitsandbytes 0.50.2 nn/modules.py Params4bit.to (quant_storage; a floating payload is cast like any "
    "tensor) and Int8Params; transformers BitsAndBytesConfig bnb_4bit_quant_storage (FSDP-QLoRA loads with bfloat16); "
    "torch 2.13 torch/nn/modules/module.py Module.to/half/bfloat16/float (_apply casts floating parameters)",
    tiered=True,
    area="moves",
)

declare(
    "MOVE-DEVICE", "MUST",
    "After a CPU eval-mode no-grad forward (which, on a CPU with AVX512-BF16, repacks a 4-bit base with the CPU "
    "packed layout on), layer.cpu(), .to('cpu') and .to(torch.device('cpu')), and under --device cuda "
    "layer.to('cuda'), .cuda() and .to(torch.device('cuda', 0)) each followed by a CUDA forward and .cpu() or "
    ".to('cpu') back, either keep the quantized base (the dequantized weight, read in bitsandbytes' standard "
    "layout, bit for bit; the packed bytes and quant state too where the layout did not change), every tensor of "
    "the layer (bitsandbytes state included; DoRA's magnitude vector too) on the new device, the adapters, and "
    "give outputs within the forward "
    "oracle bound there, or refuse: raise TypeError, ValueError or NotImplementedError from the move itself, "
    "naming the quantized layer or its storage, with the layer left as it was. For NF4/FP4 bases with and without "
    "double quant, quant_storage uint8 and floats, the CPU packed layout on (where it exists) and off, and 8-bit "
    "bases with outlier threshold 0 and 6; a move bitsandbytes itself gets wrong is listed in "
    "xfails/bitsandbytes.ini.",
    source="bitsandbytes 0.50.2 nn/modules.py Params4bit.to/cuda/cpu (cuda() calls "
    "functional._convert_weight_packed_for_cpu_inverse, to() does not), Linear4bit.forward (the CPU repack), "
    "Int8Params.to and Linear8bitLt.to (moves state.CB/SCB; Module._apply does not); torch 2.13 "
    "torch/nn/modules/module.py Module.to/cuda/cpu/_apply",
    area="moves",
)
