"""What the distributed clauses share (DDP: ``checks``; FSDP2: ``fsdp``, ``fsdp_checks``): the 2-layer stack of adapter
layers every rank and the parent build identically, its batch loss, and how the implementation reaches spawned ranks.

How the ranks get the implementation: the clauses may not import the harness (so it cannot resolve a
target string the way the loader does), hence the checks pickle the implementation *object* itself
into ``torch.multiprocessing.spawn`` (start method ``spawn``: each rank re-imports its class's module
and unpickles it). An object that does not pickle (PEFT's wrapper holds imported modules) is sent as its
class instead, which each rank instantiates with no arguments (a note says so); when neither works (a
class defined in a closure, one needing constructor arguments) the clause is ``skipped`` with both errors.
"""

from __future__ import annotations

import pickle
import socket
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from conformance.clauses.cases import AdapterCase, BaseCase, trained_magnitude
from conformance.clauses.interface import AdapterSpec
from conformance.numerics.dora import DORA_STORE_ROUNDINGS

DIMS = (32, 32, 16)  # in -> hidden -> out
#: the stack's adapters, one per method
ADAPTERS: dict[str, AdapterCase] = {
    "lora": AdapterCase("lora", {"r": 4, "lora_alpha": 8.0, "init_lora_weights": False}),
    "oft": AdapterCase("oft", {"r": 0, "oft_block_size": 8, "init_weights": False}),
    "dora": AdapterCase("dora", {"r": 4, "lora_alpha": 8.0, "init_lora_weights": False}),
}
#: the adapter's own accumulation length (rank, OFT block size) plus, for DoRA, the values it stores along its
#: longest forward+backward path (``conformance.numerics.dora.DORA_STORE_ROUNDINGS``: the norm's factor, ``f - 1``,
#: the products, sums and casts its rescaling adds to LoRA's path)
INNER = {"lora": ADAPTERS["lora"].params["r"], "oft": ADAPTERS["oft"].params["oft_block_size"],
         "dora": ADAPTERS["dora"].params["r"] + DORA_STORE_ROUNDINGS}


class _Stack(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def build_stack(impl: Any, method: str, bits: int, seed: int, device: str, *, base_case: BaseCase | None = None,
                adapter_seed: int | None = None) -> tuple[_Stack, list[nn.Module]]:
    """The 2-layer stack every rank and the parent build identically (fixed seeds, float32 adapters). A DoRA
    magnitude is moved off the row norms (``cases.trained_magnitude``, seeded), so ``m / n != 1`` and every term of
    DoRA's gradient matters. ``base_case``: the bases' settings (their shapes are the stack's; default
    ``BaseCase(bits)``); ``adapter_seed``: draws the adapters from another seed than the bases (default ``seed``)."""
    template = base_case or BaseCase(bits)
    aseed = seed if adapter_seed is None else adapter_seed
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(DIMS, DIMS[1:])):
        base = replace(template, in_features=fan_in, out_features=fan_out).build(device, seed=seed + 11 * i)
        torch.manual_seed(aseed + i)
        adapter = ADAPTERS[method]
        layer = impl.create(base, AdapterSpec(method=adapter.method, params=dict(adapter.params), dtype="float32"))
        if method == "dora":
            trained_magnitude(layer, "default", torch.Generator().manual_seed(aseed + 7 + i))
        layers.append(layer)
    return _Stack(*layers), layers


def adapter_tensors(layers: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The stack's adapter tensors (through the protocol's ``adapter_parameters``), by stable names."""
    return {f"{i}.{k}": p for i, layer in enumerate(layers) for k, p in sorted(layer.adapter_parameters("default").items())}


def loss_of(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample squared error (sum over outputs)."""
    return ((y - t) ** 2).sum(-1).mean()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def differ(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> list[str]:
    """Names whose tensors differ in bytes, shape or dtype, or that one side lacks (None on one side only)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x is None or y is None:
            if x is not y:
                out.append(k)
        elif x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            out.append(k)
    return out


def portable(impl: Any) -> Any:
    """What the ranks get: the object if it pickles, else its class (built with no arguments in each rank),
    else a string saying why neither can be sent."""
    try:
        pickle.dumps(impl)
        return impl
    except Exception as exc:  # noqa: BLE001 - any pickling error means the object cannot be sent
        why = f"{type(exc).__name__}: {exc}"
    cls = type(impl)
    try:
        pickle.dumps(cls)
        cls()
    except Exception as exc:  # noqa: BLE001 - neither the object nor a fresh instance of its class can be sent
        return (f"the implementation cannot be sent to spawned ranks: the object does not pickle ({why}) and its "
                f"class cannot be rebuilt there with no arguments ({type(exc).__name__}: {exc})")
    return cls


def rank_impl(sent: Any) -> Any:
    """The implementation in a rank: ``portable``'s object, or a fresh instance of the class it sent."""
    return sent() if isinstance(sent, type) else sent
