"""Which tensors of an adapter layer are the adapter's and which the base's, and the base layer's own output.

A library may wrap the bitsandbytes layer (PEFT: ``layer.base_layer`` is the ``bnb.nn.Linear4bit`` it was given) or
*be* it: AdapterHub ``adapters`` 1.3.0 ``src/adapters/methods/lora.py`` has ``LoRALinear4bit(LoRALinear,
Linear4bit)``, which takes over the weight and the quant state (``copy_from``), so the module it returns as the
quantized layer also holds the adapter. The suite therefore

- takes ownership from what the implementation says its adapter tensors are (``adapter_parameters(name)``, compared
  by identity), never from the module tree: the base's parameters are ``base_layer``'s minus those;
- computes the base output with the bitsandbytes class's own ``forward`` when ``base_layer`` holds the adapter
  (calling it would run the adapter too);
- keeps, in a ``state_dict`` round trip, the entries of the adapter's tensors wherever they sit.

Settings the suite puts on the base it hands over (e.g. ``support_avx512bf16_for_cpu``, the CPU layout switch) are
read back from ``layer.base_layer``, the layer the implementation returns: a library that rebuilds the layer may
drop them, and the checks judge the layer the user gets.
"""

from __future__ import annotations

from collections.abc import Iterable

import bitsandbytes as bnb
import torch
from torch import nn

#: the bitsandbytes classes whose ``forward`` is the base's output
BNB_LAYERS: tuple[type[nn.Module], ...] = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def adapter_tensor_ids(layer: nn.Module, names: Iterable[str]) -> set[int]:
    """The ``id`` of every tensor ``adapter_parameters(name)`` gives for ``names``."""
    ids: set[int] = set()
    for name in names:
        for t in layer.adapter_parameters(name).values():
            ids.add(id(t))
    return ids


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def holds_adapter(layer: nn.Module, names: Iterable[str]) -> bool:
    """Whether ``layer.base_layer`` also holds adapter tensors (a library whose layer *is* the quantized layer)."""
    ids = adapter_tensor_ids(layer, names)
    return any(id(t) in ids for _, t in _named_tensors(layer.base_layer))


def base_parameters(layer: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """``layer.base_layer``'s named parameters that are none of the adapters ``names``'s tensors."""
    ids = adapter_tensor_ids(layer, names)
    return [(n, p) for n, p in layer.base_layer.named_parameters() if id(p) not in ids]


def base_output(layer: nn.Module, x: torch.Tensor, names: Iterable[str] = ("default",)) -> torch.Tensor:
    """What the quantized base alone gives for ``x``: ``layer.base_layer(x)``, or, when the base layer holds the
    adapter too, the forward of its bitsandbytes class applied to it (the stored weight, no adapter)."""
    base = layer.base_layer
    if holds_adapter(layer, names):
        for cls in type(base).__mro__:
            if cls in BNB_LAYERS:
                return cls.forward(base, x)
    return base(x)


def _module_prefix(root: nn.Module, target: nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def adapter_state_keys(layer: nn.Module, names: Iterable[str], keys: Iterable[str]) -> list[str]:
    """Of ``keys`` (``layer.state_dict()``'s), those that are not the base's: everything outside ``base_layer``,
    and inside it (a layer that is the quantized layer) the entries of the adapters' own tensors and their
    submodules."""
    names = list(names)
    prefix = _module_prefix(layer, layer.base_layer)
    if prefix is None:
        return list(keys)
    if not holds_adapter(layer, names):
        return [k for k in keys if not (prefix == "" or _under(k, prefix))]
    ids = adapter_tensor_ids(layer, names)
    owned = [n for n, t in _named_tensors(layer) if id(t) in ids]
    return [k for k in keys if any(_under(k, n) for n in owned)]
