"""Reference LoRA, OFT and DoRA layers over bitsandbytes 4-bit and 8-bit layers (the yardstick), and over a plain
``nn.Linear`` (their dense twins, ``bits`` 0)."""

from .adapter_layer import BASE_ADAPTER, DENSE, QuantAdapterLayer, nan_message
from .dora import DoraLinear4bit, DoraLinear8bit, DoraLinearDense, DoraLinearQuant
from .lora import LoraConfig, LoraLinear4bit, LoraLinear8bit, LoraLinearDense, LoraLinearQuant
from .oft import OftConfig, OftLinear4bit, OftLinear8bit, OftLinearDense, OftLinearQuant

__all__ = [
    "BASE_ADAPTER", "DENSE", "DoraLinear4bit", "DoraLinear8bit", "DoraLinearDense", "DoraLinearQuant", "LoraConfig",
    "LoraLinear4bit", "LoraLinear8bit", "LoraLinearDense", "LoraLinearQuant", "OftConfig", "OftLinear4bit",
    "OftLinear8bit", "OftLinearDense", "OftLinearQuant",
    "QuantAdapterLayer", "nan_message",
]


def layer_class(method: str, bits: int) -> type[QuantAdapterLayer]:
    """The reference class for a method ('lora'/'oft'/'dora') and bit width (4/8; ``DENSE``, 0: a plain nn.Linear)."""
    table = {("lora", 4): LoraLinear4bit, ("lora", 8): LoraLinear8bit, ("oft", 4): OftLinear4bit,
             ("oft", 8): OftLinear8bit, ("dora", 4): DoraLinear4bit, ("dora", 8): DoraLinear8bit,
             ("lora", DENSE): LoraLinearDense, ("oft", DENSE): OftLinearDense, ("dora", DENSE): DoraLinearDense}
    try:
        return table[(method, bits)]
    except KeyError:
        raise ValueError(f"no reference layer for method={method!r}, bits={bits!r}; "
                         "methods: lora, oft, dora; bits: 4, 8, 0 (a plain nn.Linear)") from None
