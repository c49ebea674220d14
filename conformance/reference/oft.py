"""Reference OFT over bitsandbytes 4-bit and 8-bit layers.

Semantics follow PEFT (``peft/tuners/oft/layer.py``) and the OFT paper (arXiv:2306.07280): the
input is rotated block-wise, ``y = base(x @ R)`` with ``R = blockdiag(R_1..R_r)`` orthogonal, so the
merged weight is ``W' = W R^T`` and unmerge applies the inverse rotation (``R^T`` for an exact
Cayley rotation; the exact inverse in general, as PEFT does with ``torch.linalg.inv``).
Exactly one of ``r`` (number of blocks) and ``oft_block_size`` sets the layout; unlike PEFT,
which silently adjusts a value that does not divide ``in_features`` with a warning, the
reference refuses it with a message that lists the valid values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import rotation
from .adapter_layer import BASE_ADAPTER, DENSE, QuantAdapterLayer


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class OftConfig:
    r: int = 8
    oft_block_size: int = 0
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    init_weights: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5

    def layout(self, in_features: int) -> tuple[int, int]:
        """(number of blocks, block size) for a layer with ``in_features`` inputs."""
        r, bs = self.r, self.oft_block_size
        if (r == 0) == (bs == 0):
            raise ValueError(
                f"set exactly one of r (number of blocks) and oft_block_size, got r={r}, oft_block_size={bs}; "
                "e.g. r=8, oft_block_size=0 or r=0, oft_block_size=32"
            )
        value, what = (r, "r") if r else (bs, "oft_block_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or in_features % value:
            raise ValueError(
                f"{what}={value!r} does not divide in_features={in_features}; "
                f"valid values: {_divisors(in_features)}"
            )
        blocks = r if r else in_features // bs
        return blocks, in_features // blocks

    def validate(self, in_features: int) -> None:
        blocks, size = self.layout(in_features)
        if size < 2:
            raise ValueError(f"block size {size} has no rotation parameters; use fewer, larger blocks (r < {in_features})")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if self.coft and not self.eps > 0:
            raise ValueError(f"coft needs eps > 0, got {self.eps!r}")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 1:
            raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {self.num_cayley_neumann_terms}")


class OftLinearQuant(QuantAdapterLayer):
    method: ClassVar[str] = "oft"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        oft_block_size: int = 0,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        init_weights: bool = True,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
    ) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ParameterDict()
        self.add_adapter(
            adapter_name, r=r, oft_block_size=oft_block_size, module_dropout=module_dropout, coft=coft, eps=eps,
            block_share=block_share, init_weights=init_weights, use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
        )
        self.set_adapter(adapter_name)

    def _new_adapter(self, name: str, **kwargs: Any) -> None:
        cfg = OftConfig(**kwargs)
        cfg.validate(self.in_features)
        blocks, size = cfg.layout(self.in_features)
        rows = 1 if cfg.block_share else blocks
        w = torch.zeros(rows, rotation.n_elements(size), device=self.base_layer.weight.device)
        if not cfg.init_weights:
            nn.init.normal_(w, mean=0.0, std=0.1)
        self.oft_R[name] = nn.Parameter(w, requires_grad=name in self.active_adapters)
        self.configs[name] = cfg

    def _drop_adapter(self, name: str) -> None:
        del self.oft_R[name], self.configs[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        self._require_known([name])
        return {"oft_R.weight": self.oft_R[name]}

    def layout(self, name: str) -> tuple[int, int]:
        return self.configs[name].layout(self.in_features)

    def rotation_blocks(self, name: str) -> torch.Tensor:
        """(k, b, b) rotation blocks (k = 1 with block sharing), projected first under COFT."""
        cfg = self.configs[name]
        _, size = self.layout(name)
        param = self.oft_R[name]
        if cfg.coft:
            # PEFT projects the stored parameters in place before use (oft/layer.py, forward)
            with torch.no_grad():
                param.copy_(rotation.coft_project(param, size, cfg.eps))
        q = rotation.skew(param, size)
        return rotation.cayley(q, neumann_terms=cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else None)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The block-diagonal rotation R (in x in), as PEFT's ``get_delta_weight``."""
        self._require_known([adapter])
        blocks, _ = self.layout(adapter)
        return rotation.block_diagonal(self.rotation_blocks(adapter), blocks)

    def _merged_weights(self, name, weight, bias):
        r = self.get_delta_weight(name).detach().to(weight.dtype)
        return weight @ r.t(), bias

    def _merge_order(self, names: list[str]) -> list[str]:
        """Forward rotates ``x`` by the active adapters in order (``x R_1 R_2``), while merging one
        adapter at a time (``W <- W R^T``) composes in reverse (``W R_1^T R_2^T`` is ``x R_2 R_1``):
        merge the adapter applied last first so the merged layer equals the stacked forward
        (clause MERGE-MULTI)."""
        pos = {n: i for i, n in enumerate(self.active_adapters)}
        return sorted(names, key=lambda n: pos.get(n, -1), reverse=True)

    def _unmerged_weights(self, name, weight, bias):
        r = self.get_delta_weight(name).detach().double()
        # W' = W R^T  =>  W = W' R^{-T}; solve rather than invert (R^{-T} = R for exact Cayley)
        w = torch.linalg.solve(r, weight.double().t()).t()
        return w.to(weight.dtype), bias

    def _dropout(self, name: str, blocks: torch.Tensor) -> torch.Tensor:
        p = self.configs[name].module_dropout
        if not self.training or p == 0 or blocks.shape[0] == 1:
            return blocks
        # PEFT MultiplicativeDropoutLayer: int(p * D) random blocks become the identity
        d, b, _ = blocks.shape
        mask = torch.zeros(d, device=blocks.device)
        mask[torch.randperm(d, device=blocks.device)[: int(p * d)]] = 1
        eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
        return torch.where(mask.view(d, 1, 1).bool(), eye, blocks)

    def _rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        blocks = self._dropout(name, self.rotation_blocks(name))
        n_blocks, _ = self.layout(name)
        return rotation.rotate_input(x.to(blocks.dtype), blocks, n_blocks)

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        self._check_input(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x)
        if self.merged:
            return self._base_forward(x)
        if adapter_names is not None:
            rotated = x.clone()
            for name, rows in self._groups(adapter_names).items():
                if name == BASE_ADAPTER:
                    continue
                idx = torch.tensor(rows, device=x.device)
                rotated = rotated.index_copy(0, idx, self._rotate(name, x.index_select(0, idx)).to(x.dtype))
            return self._base_forward(rotated)
        h = x
        for name in self.active_adapters:
            h = self._rotate(name, h).to(x.dtype)
        return self._base_forward(h)


class OftLinear4bit(OftLinearQuant):
    """OFT over ``bnb.nn.Linear4bit`` (NF4/FP4)."""

    bits: ClassVar[int] = 4


class OftLinear8bit(OftLinearQuant):
    """OFT over ``bnb.nn.Linear8bitLt``."""

    bits: ClassVar[int] = 8


class OftLinearDense(OftLinearQuant):
    """OFT over a plain ``torch.nn.Linear``: the reference's dense twin."""

    bits: ClassVar[int] = DENSE
