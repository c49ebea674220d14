"""The layer an implementation returns follows the protocol the other clauses rely on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from conformance.clauses.clause import check
from conformance.numerics.dora import MAGNITUDE
from conformance.quant import layers as qlayers

from ..cases import BaseCase, adapter_cases

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext

_REQUIRED = ("forward", "merge", "get_delta_weight", "set_adapter", "adapter_parameters")
_OPTIONAL = {"unmerge": ("unmerge",), "multi_adapter": ("add_adapter",)}  # capability -> methods it promises
#: the canonical ``adapter_parameters`` names of each method (DoRA: LoRA's plus the magnitude vector,
#: ``numerics.dora.MAGNITUDE``; PEFT ``lora_magnitude_vector[name].weight``)
_KEYS = {"lora": {"lora_A.weight", "lora_B.weight"}, "oft": {"oft_R.weight"},
         "dora": {"lora_A.weight", "lora_B.weight", MAGNITUDE}}


@check("LAYER-PROTOCOL-SURFACE")
def check_protocol_surface(ctx: CheckContext) -> None:
    for method, bits in ctx.cases():
        case = adapter_cases(method)[0]
        base = ctx.make_base(BaseCase(bits))
        layer = ctx.make_layer(base, method, **case.params)
        where = f"{method} {bits}-bit"
        ctx.check(isinstance(layer, nn.Module), f"{where}: create() returned {type(layer).__name__}, not an nn.Module")
        needed = _REQUIRED + tuple(m for cap, ms in _OPTIONAL.items() if ctx.has(cap) for m in ms)
        missing = [m for m in needed if not callable(getattr(layer, m, None))]
        ctx.check(not missing, f"{where}: layer lacks {missing}")
        ctx.check(layer.merged is False, f"{where}: a fresh layer reports merged={layer.merged!r}")
        ctx.check(list(layer.merged_adapters) == [], f"{where}: fresh layer has merged_adapters={layer.merged_adapters}")
        ctx.check(qlayers.bits_of(layer.base_layer) == bits, f"{where}: base_layer is {type(layer.base_layer).__name__}")
        keys = set(layer.adapter_parameters("default"))
        ctx.check(_KEYS[method] <= keys, f"{where}: adapter_parameters keys {sorted(keys)} lack {sorted(_KEYS[method])}")
