"""Case matrices: the data the checks iterate (torch OpInfo style). One place, imported everywhere.

A ``BaseCase`` describes a quantized base layer, an ``AdapterCase`` the adapter put on it.
Checks combine them; hypothesis strategies in ``conformance.spec.strategies`` draw from the same
value lists, so widening a list here widens every suite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((64, 48), (48, 64), (64, 64), (96, 40))  # (in_features, out_features): square and not
RANKS = (1, 4, 8)
ALPHAS = (1.0, 8.0, 16.0)
OFT_BLOCK_SIZES = (4, 8, 16)


@dataclass(frozen=True)
class BaseCase:
    bits: int
    in_features: int = 64
    out_features: int = 48
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    bias: bool = True

    def kwargs(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("in_features")
        d.pop("out_features")
        if self.bits == 8:
            for k in ("quant_type", "blocksize", "double_quant"):
                d.pop(k)
        return d

    @property
    def label(self) -> str:
        dt = str(self.compute_dtype).removeprefix("torch.")
        if self.bits == 8:
            return f"int8-{self.in_features}x{self.out_features}-{dt}"
        dq = "-dq" if self.double_quant else ""
        return f"{self.quant_type}{dq}-b{self.blocksize}-{self.in_features}x{self.out_features}-{dt}"


@dataclass(frozen=True)
class AdapterCase:
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + "".join(f"-{k}={v}" for k, v in sorted(self.params.items()))


def base_cases(bits: int, *, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> list[BaseCase]:
    """A small cross-section of base layers: both quant types, double quant on/off, non-square."""
    if bits == 8:
        return [BaseCase(8, i, o, compute_dtype=d) for (i, o) in SHAPES[:2] for d in dtypes]
    out = []
    for qt in QUANT_TYPES:
        for dq in (False, True):
            for (i, o) in SHAPES[:2]:
                for d in dtypes:
                    out.append(BaseCase(4, i, o, quant_type=qt, double_quant=dq, compute_dtype=d))
    return out


def adapter_cases(method: str) -> list[AdapterCase]:
    """Non-trivial adapters (random B / non-identity R), with alpha != r and rsLoRA/COFT/Neumann variants."""
    if method == "lora":
        return [
            AdapterCase("lora", {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}),
            AdapterCase("lora", {"r": 8, "lora_alpha": 8.0, "init_lora_weights": False, "use_rslora": True}),
        ]
    if method == "oft":
        return [
            AdapterCase("oft", {"r": 4, "oft_block_size": 0, "init_weights": False}),
            AdapterCase("oft", {"r": 0, "oft_block_size": 8, "init_weights": False, "block_share": True}),
        ]
    raise ValueError(f"unknown method {method!r}")
