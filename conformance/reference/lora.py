"""Reference LoRA over bitsandbytes 4-bit and 8-bit layers.

Semantics follow PEFT (``peft/tuners/lora/layer.py``, ``peft/tuners/lora/bnb.py``):
``y = base(x) + scaling * B(A(dropout(x)))`` with ``scaling = alpha/r`` (rsLoRA: ``alpha/sqrt(r)``),
``lora_bias`` gives ``B`` a bias that is scaled like the rest of ``B``'s output and merged into the
base bias as ``scaling * b_B`` (what PEFT's unquantized ``Linear`` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from conformance.core.inits import Init, of_value

from .adapter_layer import BASE_ADAPTER, DENSE, QuantAdapterLayer
from .inits import initialize


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    #: True (B = 0), False (B random), or an initialization that reads the base (``conformance.core.inits``:
    #: 'pissa', 'pissa_niter_N', 'olora', 'loftq'; ``conformance.reference.inits``)
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    lora_bias: bool = False
    #: LoftQ's float weight (out x in), the one the base was quantized from
    loftq_weight: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the rank of the update), got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_lora_weights, bool) and of_value(self.init_lora_weights) in (
                None, Init.CORDA, Init.LORA_GA):
            raise ValueError(
                f"init_lora_weights must be True (B = 0), False (random B), 'pissa', 'pissa_niter_N', 'olora' or "
                f"'loftq', got {self.init_lora_weights!r}"
            )
        if self.loftq_weight is not None and self.init_lora_weights != "loftq":
            raise ValueError("loftq_weight is read by init_lora_weights='loftq' only")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinearQuant(QuantAdapterLayer):
    method: ClassVar[str] = "lora"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        clone_base_output: bool = True,
        loftq_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__(base_layer)
        self.clone_base_output = clone_base_output
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.add_adapter(
            adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights, use_rslora=use_rslora, lora_bias=lora_bias,
            **({} if loftq_weight is None else {"loftq_weight": loftq_weight}),
        )
        self.set_adapter(adapter_name)

    def _new_adapter(self, name: str, **kwargs: Any) -> None:
        cfg = LoraConfig(**kwargs)
        if cfg.lora_bias and getattr(self.base_layer, "bias", None) is None:
            raise ValueError("lora_bias=True needs a base layer with a bias (it is merged into that bias)")
        device = self.base_layer.weight.device
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=device)
        b = nn.Linear(cfg.r, self.out_features, bias=cfg.lora_bias, device=device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        if cfg.init_lora_weights:
            nn.init.zeros_(b.weight)
            if b.bias is not None:
                nn.init.zeros_(b.bias)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.configs[name] = cfg
        self.scaling[name] = cfg.scaling
        if isinstance(cfg.init_lora_weights, str):
            initialize(self, name, cfg.init_lora_weights, cfg.loftq_weight)
        for p in (*a.parameters(), *b.parameters()):
            p.requires_grad_(name in self.active_adapters)

    def _drop_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.configs[name], self.scaling[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        self._require_known([name])
        out = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if self.lora_B[name].bias is not None:
            out["lora_B.bias"] = self.lora_B[name].bias
        return out

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` (out x in), in the adapter's dtype."""
        self._require_known([adapter])
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _merged_weights(self, name, weight, bias):
        new_bias = bias
        b = self.lora_B[name].bias
        if b is not None:
            new_bias = bias + self.scaling[name] * b.detach().to(bias.dtype)
        return weight + self.get_delta_weight(name).detach().to(weight.dtype), new_bias

    def _unmerged_weights(self, name, weight, bias):
        new_bias = bias
        b = self.lora_B[name].bias
        if b is not None:
            new_bias = bias - self.scaling[name] * b.detach().to(bias.dtype)
        return weight - self.get_delta_weight(name).detach().to(weight.dtype), new_bias

    def _lora(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(a.weight.dtype))
        return torch.nn.functional.linear(torch.nn.functional.linear(h, a.weight), b.weight, b.bias)

    def _add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``result + scaling * B(A(dropout(x)))``; ``result`` is written only when ``inplace``."""
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        xa = torch.nn.functional.linear(self.lora_dropout[name](x.to(a.weight.dtype)), a.weight)  # one cast of x
        if b.bias is None and xa.dtype == result.dtype:
            # B's GEMM adds into the output with alpha=scaling (cuBLAS epilogue, beta=1): no delta tensor, no
            # separate scale/add passes forward or backward. Out of place it moves the same bytes as in place
            # and never writes bnb's output, which is all PEFT's defensive clone (peft lora/bnb.py) protects.
            xa2, bt = xa.reshape(-1, xa.shape[-1]), b.weight.t()  # addmm wants 2-D: (tokens, r) @ (r, out)
            if inplace:
                # clone_base_output=False: write bnb's output through a 2-D view, the update the
                # defensive clone exists to protect (the clone probe's "addmm_" pattern)
                result.view(-1, self.out_features).addmm_(xa2, bt, alpha=s)
                return result
            return torch.addmm(result.reshape(-1, self.out_features), xa2, bt, alpha=s).view(result.shape)
        # lora_bias, or adapters in another dtype than the output: delta first (the bias is scaled with it)
        delta = torch.nn.functional.linear(xa, b.weight, b.bias).to(result.dtype)
        return result.add_(delta, alpha=s) if inplace else torch.add(result, delta, alpha=s)

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        self._check_input(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x)
        if self.merged:
            return self._base_forward(x)
        result = self._base_forward(x)
        # peft/tuners/lora/bnb.py: "As per Tim Dettmers, for 4bit, we need to defensively
        # clone here" -- bnb may hand back a view that in-place updates must not touch. With
        # clone_base_output the base output is never written in place: updates go out of place
        # (a fresh tensor at no extra pass), and a result with nothing added is cloned.
        writable = not self.clone_base_output
        if adapter_names is not None:
            if not writable:
                result = result.clone()
            for name, rows in self._groups(adapter_names).items():
                if name == BASE_ADAPTER:
                    continue
                idx = torch.tensor(rows, device=x.device)
                delta = self._lora(name, x.index_select(0, idx)) * self.scaling[name]
                result.index_add_(0, idx, delta.to(result.dtype))
            return result
        for name in self.active_adapters:
            result = self._add_lora(name, x, result, inplace=writable)
            writable = True  # from here on result is our own tensor
        return result if writable else result.clone()


class LoraLinear4bit(LoraLinearQuant):
    """LoRA over ``bnb.nn.Linear4bit`` (NF4/FP4)."""

    bits: ClassVar[int] = 4


class LoraLinear8bit(LoraLinearQuant):
    """LoRA over ``bnb.nn.Linear8bitLt`` (LLM.int8 row-wise)."""

    bits: ClassVar[int] = 8


class LoraLinearDense(LoraLinearQuant):
    """LoRA over a plain ``torch.nn.Linear``: the reference's dense twin (no requantization, no rounding warning)."""

    bits: ClassVar[int] = DENSE
