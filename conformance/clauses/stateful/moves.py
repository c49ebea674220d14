"""Stateful ops that copy or move the layer: a state_dict round trip, a deepcopy, a dtype move and a device move
(the op table is in ``ops``)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from conformance import numerics
from conformance.clauses import ownership
from conformance.clauses.interface import AdapterSpec
from conformance.clauses.stateful.declare import ADAPTERS, BASE, VALID
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_of

from .config import seed_for
from .driver import Driver

if TYPE_CHECKING:
    from .ops import Args


def state_dict_roundtrip(d: Driver, a: Args) -> None:
    """state_dict() of the adapter tensors, loaded into a fresh layer over a fresh base."""
    names = d.names
    full = d.layer.state_dict()
    sd = {k: full[k] for k in ownership.adapter_state_keys(d.layer, names, full)}
    if not sd:
        d.fail(ADAPTERS, "state_dict round trip: layer.state_dict() holds none of the adapters' tensors (the saved "
                         "state would restore nothing)")
    first = d.model.adapters[names[0]]
    holder: dict[str, Any] = {}

    def go() -> None:
        seed_for(d.device, a["seed"])
        fresh = d.impl.create(d.fresh_base(), AdapterSpec(d.method, names[0], dict(first.params)))
        for n in names[1:]:
            fresh.add_adapter(n, **d.model.adapters[n].params)
        fresh.set_adapter(list(d.model.active))
        if d.model.disabled:
            fresh.enable_adapters(False)
        fresh.train(d.model.training)
        for n, ad in d.model.adapters.items():  # the same dtype moves as the saved layer
            for k, p in fresh.adapter_parameters(n).items():
                if k in ad.tensors and p.dtype != ad.tensors[k].dtype:
                    p.data = p.data.to(ad.tensors[k].dtype)
        holder["res"] = fresh.load_state_dict(sd, strict=False)
        holder["layer"] = fresh

    d.call("build a fresh layer and load_state_dict", go)
    res, fresh = holder["res"], holder["layer"]
    missing = ownership.adapter_state_keys(fresh, names, res.missing_keys)
    if missing or res.unexpected_keys:
        d.fail(ADAPTERS, f"state_dict round trip: keys missing in the saved state {missing}, unexpected "
                         f"{list(res.unexpected_keys)}")
    d.layer = fresh
    d.model.w, d.model.b = numerics.base_weights(fresh.base_layer)
    if not d.model.w.equal(d.model.w_orig):
        d.fail(BASE, "a fresh base built with the same settings dequantizes to other weights than the original one")
    d.model.reset_chains(original=True)
    d.snap = qlayers.snapshot(fresh.base_layer)
    d.check_flags(where="after the state_dict round trip: ")
    d.check_adapters(where="after the state_dict round trip: ")


def deepcopy(d: Driver, a: Args) -> None:
    d.layer = d.call("copy.deepcopy(layer)", lambda: copy.deepcopy(d.layer))


def dtype_move(d: Driver, a: Args) -> None:
    dt = dtype_of(a["dtype"])

    def go() -> None:
        for n in d.names:
            for p in d.layer.adapter_parameters(n).values():
                p.data = p.data.to(dt)

    d.call(f"adapter parameters .to({a['dtype']})", go)
    for ad in d.model.adapters.values():
        ad.tensors = {k: v.to(dt) for k, v in ad.tensors.items()}


def device_move(d: Driver, a: Args) -> None:
    device = a["device"]
    d.layer = d.call(f"layer.to({device!r})", lambda: d.layer.to(device))
    d.device = device
    # Checked before any kernel runs on the moved layer: a tensor left on the other device is
    # reported here instead of crashing the process at the next forward (see
    # conformance.quant.layers.tensors_off_device; finding: bitsandbytes 0.50.2 Linear8bitLt.state.CB/SCB
    # stay behind when a parent module is moved, because nn.Module.to() reaches children through
    # _apply, not their .to()).
    stale = qlayers.tensors_off_device(d.layer, device)
    if stale:
        d.fail(VALID, f"device_move: layer.to({device!r}) left tensors on another device: "
                      f"{', '.join(stale[:6])}{' ...' if len(stale) > 6 else ''}; a forward would hand "
                      "them to the kernels of the new device (on CUDA: an illegal memory access)")


def _other_device(d: Driver) -> str:
    return "cpu" if str(d.device).startswith("cuda") else "cuda"
