"""Read and rewrite the weights of bitsandbytes layers.

Every merge in this project is *dequantize -> modify -> requantize with the original
settings* (PEFT's merge in ``peft/tuners/lora/bnb.py``). These helpers are the only place that knows how a
``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` stores its weight, so the reference
layers, the bounds and the checks all read it the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn


class BaseLayerError(TypeError):
    """A base layer is not one of the bitsandbytes layers this project supports."""


def bits_of(layer: nn.Module) -> int:
    """4 for ``bnb.nn.Linear4bit``, 8 for ``bnb.nn.Linear8bitLt``; a clear error otherwise."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return 4
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return 8
    raise BaseLayerError(
        f"expected a bitsandbytes quantized linear layer (bnb.nn.Linear4bit or bnb.nn.Linear8bitLt), "
        f"got {type(layer).__module__}.{type(layer).__qualname__}; quantize the layer first "
        "(build it with bnb.nn.Linear4bit/Linear8bitLt and move it to a device)"
    )


def is_dense(layer: nn.Module) -> bool:
    """A plain ``torch.nn.Linear`` (not a bitsandbytes subclass): the base of a dense twin."""
    return isinstance(layer, nn.Linear) and not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def has_fp16_weights(layer: nn.Module) -> bool:
    """Whether an 8-bit layer keeps a float16 weight and quantizes it at each forward (``Int8Params.has_fp16_weights``,
    bitsandbytes' default and LitGPT's int8 training mode; transformers loads False); False for a 4-bit layer."""
    return bits_of(layer) == 8 and bool(getattr(layer.weight, "has_fp16_weights", False))


def is_sharded(layer: nn.Module) -> bool:
    """Whether the layer's weight is a shard: a ``DTensor``, what torch's FSDP2 (``fully_shard``) leaves in the module
    between forwards. Its bytes are this rank's part of the payload and it carries no quant state."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed: nothing is sharded
        return False
    return isinstance(getattr(layer, "weight", None), DTensor)


def quant_state_of(layer: nn.Module) -> Any:
    """The quant state of a 4-bit layer where bitsandbytes looks for it: on the weight (``Params4bit.quant_state``), else
    on the module (``Linear4bit.quant_state``), which bitsandbytes 0.50.2 keeps for a weight that lost its own: FSDP
    puts a plain tensor in the module, and ``Linear4bit.forward`` reattaches the module's state to it
    (``nn/modules.py fix_4bit_weight_quant_state_from_module``). None when neither has one."""
    qs = getattr(getattr(layer, "weight", None), "quant_state", None)
    return qs if qs is not None else getattr(layer, "quant_state", None)


def is_quantized(layer: nn.Module) -> bool:
    """True once bitsandbytes has packed the weight (it does so on the first ``.to(device)``). An 8-bit layer with
    ``has_fp16_weights`` never packs it: its floating weight is quantized by every forward that needs it
    (``autograd/_functions.py``), so it is ready as it is. A 4-bit weight FSDP gathered back into a plain tensor
    is quantized when the module keeps its quant state (``quant_state_of``); a sharded one is not readable here."""
    w = layer.weight
    if bits_of(layer) == 4:
        if isinstance(w, bnb.nn.Params4bit):
            return bool(getattr(w, "bnb_quantized", False)) and w.quant_state is not None
        return not is_sharded(layer) and quant_state_of(layer) is not None
    if has_fp16_weights(layer):
        return w.is_floating_point()
    return w.dtype == torch.int8


def require_quantized(layer: nn.Module) -> None:
    if is_sharded(layer):
        raise BaseLayerError(
            f"the base layer {type(layer).__name__} holds a shard of its weight (a DTensor: the module is sharded by "
            "FSDP2's fully_shard), not the whole payload; unshard() the module first"
        )
    if not is_quantized(layer):
        raise BaseLayerError(
            f"the base layer {type(layer).__name__} holds an unquantized weight; bitsandbytes quantizes "
            "on the first move to a device: call layer.to('cpu') or layer.to('cuda') first"
        )


def int8_of(layer: nn.Module, *, on: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB): the int8 rows and row absmax statistics an 8-bit layer multiplies by.

    Stored (``has_fp16_weights`` False): the int8 weight and its statistics, wherever bitsandbytes keeps them now.
    ``has_fp16_weights`` True: computed from the floating weight with bitsandbytes' own quantizer, as its matmul does
    (bitsandbytes 0.50.2 ``autograd/_functions.py`` ``MatMul8bitLt``/``MatMul8bitFp``:
    ``int8_vectorwise_quant(B.to(torch.float16))``, no threshold). Its ``MatmulLtState`` caches the result between
    eval-mode forwards (recomputed on every training-mode forward, or once ``state.reset_grads()`` cleared it):
    this is what the weight defines, not a cache that may be stale. ``on``: copies on that device (the float16
    weight is moved before it is quantized, so the kernel of ``on`` does it)."""
    w = layer.weight
    if has_fp16_weights(layer):
        data = w.data if on is None else w.data.to(on)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(data.to(torch.float16).contiguous())
        return cb, scb
    where = w.device if on is None else on
    return w.data.to(where), scb_of(layer).to(where)


def scb_of(layer: nn.Module) -> torch.Tensor:
    """Row-wise absmax statistics of an 8-bit layer, wherever bitsandbytes keeps them now (``has_fp16_weights``:
    those of its float16 weight, ``int8_of``)."""
    if has_fp16_weights(layer):
        return int8_of(layer)[1]
    scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
    if scb is None:
        raise BaseLayerError("8-bit layer has no SCB statistics: it was never quantized")
    return scb


def follow_weight_device(module: nn.Module) -> None:
    """Move the 8-bit statistics bitsandbytes keeps outside parameters to their weight's device.

    ``nn.Module.to()`` on a *parent* of a ``bnb.nn.Linear8bitLt`` moves the weight through
    ``Int8Params.to()`` but keeps only its data (``param.data = moved``): the ``CB``/``SCB``
    attributes of the weight and ``Linear8bitLt.state`` still point at the old device, and the
    next forward writes ``state.CB`` back into the weight. Only ``Linear8bitLt.to()`` called on the
    layer itself moves them (bitsandbytes 0.50.2, ``nn/modules.py``). On CUDA a forward after
    such a move reads CPU pointers: an illegal memory access. Clause STATE-VALID-NEVER-RAISES.
    Aliases survive the move: a tensor shared by the weight and the state stays shared.
    """
    for mod in module.modules():
        if isinstance(mod, bnb.nn.Linear8bitLt):
            _follow_int8(mod)


def _follow_int8(layer: nn.Module) -> None:
    w, state = layer.weight, layer.state
    dev = w.device
    moved: dict[int, torch.Tensor] = {}
    if w.dtype == torch.int8 and getattr(w, "CB", None) is not None and w.CB.device != dev:
        moved[id(w.CB)] = w.data  # Int8Params.to() makes CB the moved data itself

    def follow(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device == dev or t.device.type == "meta":
            return t
        if id(t) not in moved:
            moved[id(t)] = t.to(dev)
        return moved[id(t)]

    for obj, keys in ((w, ("CB", "SCB")), (state, ("CB", "SCB", "CBt", "SCBt"))):
        for k in keys:
            if hasattr(obj, k):
                setattr(obj, k, follow(getattr(obj, k)))


def move_base_layer(layer: nn.Module, device: str | torch.device) -> nn.Module:
    """``layer.to(device)`` for a bitsandbytes layer, with the 8-bit state it leaves behind moved too
    (see ``follow_weight_device``: bitsandbytes 0.50.2's ``Linear8bitLt.to()`` moves ``state.CB``/``SCB``
    but not ``weight.CB``/``SCB``)."""
    layer = layer.to(device)
    follow_weight_device(layer)
    return layer


def quiet_int8_cast_notice() -> None:
    """Silence bitsandbytes' "MatMul8bitLt: inputs will be cast from ... to float16" log line.

    bitsandbytes 0.50.2 logs it (``logging``, not ``warnings``) on every non-fp16 CUDA forward of
    an 8-bit layer in eval mode; the oracle models that cast (``conformance.numerics.expected``), and the
    2220 copies one ``nox -s gpu`` run printed buried its output. Command-line entry points call this.
    """
    import logging

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def tensors_off_device(layer: nn.Module, device: str) -> list[str]:
    """Tensors of ``layer`` (parameters, buffers and the bitsandbytes state kept outside them) not on ``device``.

    bitsandbytes 0.50.2 keeps quantization state in plain attributes that ``nn.Module.to()``
    does not see: ``Params4bit.quant_state`` (moved in place by ``Params4bit.to``),
    ``Int8Params.CB``/``SCB`` and ``Linear8bitLt.state.CB``/``SCB`` (moved only by
    ``Linear8bitLt.to()`` itself). A kernel handed a tensor of another device reads a foreign
    pointer: on CUDA an illegal memory access that breaks the process' CUDA context.
    """
    want = torch.device(device).type
    out: list[str] = []

    def look(name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type not in (want, "meta"):
            out.append(f"{name} on {t.device}")

    for mname, mod in layer.named_modules():
        pre = f"{mname}." if mname else ""
        for pname, p in mod.named_parameters(recurse=False):
            look(pre + pname, p)
        for bname, b in mod.named_buffers(recurse=False):
            look(pre + bname, b)
        w = getattr(mod, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for k in ("absmax", "code", "offset"):
                look(f"{pre}weight.quant_state.{k}", getattr(qs, k, None))
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                for k in ("absmax", "code"):
                    look(f"{pre}weight.quant_state.state2.{k}", getattr(s2, k, None))
            if getattr(qs, "packing_format_for_cpu", False) and want != "cpu":
                out.append(f"{pre}weight is in bitsandbytes' CPU packing format (packing_format_for_cpu)")
        for k in ("CB", "SCB"):
            look(f"{pre}weight.{k}", getattr(w, k, None))
        st_ = getattr(mod, "state", None)
        if st_ is not None and type(st_).__name__ == "MatmulLtState":
            for k in ("CB", "SCB", "CBt", "SCBt"):
                look(f"{pre}state.{k}", getattr(st_, k, None))
    return out


# -- bitsandbytes' CPU packed layout -----------------------------------------------------------

#: rows per tile of bitsandbytes' CPU packed layout (``functional._convert_weight_packed_for_cpu``'s ``block_n``)
CPU_PACK_BLOCK_N = 32


class PackedLayoutUnavailable(BaseLayerError):
    """A base with bitsandbytes' CPU packed layout was asked for where that layout does not exist."""


def cpu_packed_layout_available() -> bool:
    """Whether bitsandbytes repacks 4-bit layers on this CPU: its native ``has_avx512bf16`` (AVX512-BF16).

    bitsandbytes 0.50 sets ``Linear4bit.support_avx512bf16_for_cpu`` from it and registers the packed CPU
    kernel (``backends/cpu/ops.py`` ``gemv_4bit``) only then; elsewhere a packed weight has no kernel."""
    has = getattr(bnb.functional, "has_avx512bf16", None)
    return bool(has()) if has is not None else False


def cpu_packed_shape_refusal(in_features: int, out_features: int, blocksize: int) -> str | None:
    """Why bitsandbytes 0.50.2 cannot repack a weight of this shape (None when it can): the repack asserts
    ``N % block_n == 0`` and reshapes absmax to ``(out, in // blocksize)`` (``_convert_weight_packed_for_cpu``)."""
    if out_features % CPU_PACK_BLOCK_N:
        return f"out_features {out_features} is not a multiple of {CPU_PACK_BLOCK_N} (\"N must be divisible by block_n\")"
    if in_features % blocksize:
        return f"in_features {in_features} is not a multiple of the blocksize {blocksize} (absmax reshape)"
    return None


def is_cpu_packed(layer: nn.Module) -> bool:
    """True once bitsandbytes has repacked the 4-bit weight into its CPU layout (``packing_format_for_cpu``)."""
    qs = quant_state_of(layer)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def repacks_on_eval(layer: nn.Module) -> bool:
    """Whether an eval-mode forward whose input needs no grad repacks this layer (``Linear4bit.forward``:
    CPU weight, ``support_avx512bf16_for_cpu``, not yet packed)."""
    return (isinstance(layer, bnb.nn.Linear4bit) and bool(getattr(layer, "support_avx512bf16_for_cpu", False))
            and layer.weight.device.type == "cpu" and not is_cpu_packed(layer))


def forward_is_packed(layer: nn.Module, *, training: bool | None = None, x_requires_grad: bool = False) -> bool:
    """Whether the next forward of ``layer`` runs bitsandbytes' packed CPU kernel: it is packed already (then
    every forward does, ``autograd/_functions.py matmul_4bit``), or this forward repacks it."""
    is_training = layer.training if training is None else training
    return is_cpu_packed(layer) or (repacks_on_eval(layer) and not is_training and not x_requires_grad)


def standard_layout(layer: nn.Module) -> tuple[torch.Tensor, Any]:
    """(packed bytes, quant state) of a 4-bit layer in bitsandbytes' standard layout, whatever layout it has now.

    A repacked layer (``is_cpu_packed``) is read through a *copy* turned back by bitsandbytes' own
    ``_convert_weight_packed_for_cpu_inverse`` (it mutates the state it is given), with the absmax the packed
    kernel multiplies by: the repack stored it as bfloat16 (and dropped double quantization), so the weight this
    describes is the one the layer computes with now, not the one it was quantized to."""
    w = layer.weight
    qs = quant_state_of(layer)
    if not is_cpu_packed(layer):
        return w.data, qs
    state = copy.copy(qs)
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data.clone(), state)
    # the inverse re-quantizes a nested absmax; the packed kernel uses the bfloat16 one as it is
    state.absmax = qs.absmax.float().t().reshape(-1).contiguous()
    state.nested = False
    state.state2 = None
    state.offset = None
    return data, state


def weight_dtype_of(layer: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer was quantized from (``quant_state.dtype``; a repack overwrites it with bfloat16
    and keeps the original as ``original_dtype``)."""
    qs = quant_state_of(layer)
    return getattr(qs, "original_dtype", qs.dtype) if is_cpu_packed(layer) else qs.dtype


def double_quant_of(layer: nn.Module) -> bool:
    """Whether a 4-bit layer was quantized with double quantization (a repack sets ``nested`` False)."""
    qs = quant_state_of(layer)
    return bool(getattr(qs, "original_nested", qs.nested)) if is_cpu_packed(layer) else bool(qs.nested)


def dequantize(layer: nn.Module, *, on: str | torch.device | None = None) -> torch.Tensor:
    """The weight as bitsandbytes would use it, in float32, shape (out_features, in_features); a 4-bit layer in
    bitsandbytes' CPU packed layout is read through ``standard_layout``; an 8-bit layer with ``has_fp16_weights`` is
    its float16 weight quantized and dequantized row-wise by bitsandbytes' own functions (``int8_of``). ``on``: read
    on that device from copies of the payload and quant state (the same kernel reads a layer before and after a
    device move, so a difference is one of what it stores); the layer is left as it was."""
    require_quantized(layer)
    if bits_of(layer) == 4:
        data, state = standard_layout(layer)
        if on is not None:
            state = copy.deepcopy(state)
            state.to(on)  # QuantState.to moves its tensors in place: the copy's
            data = data.to(on)
        return bnb.functional.dequantize_4bit(data, state).float()
    return bnb.functional.int8_vectorwise_dequant(*int8_of(layer, on=on)).float()


def params4bit_settings(layer: nn.Module) -> dict[str, Any]:
    """The ``Params4bit`` settings a 4-bit layer was quantized with (blocksize, double quant, quant type, quant storage):
    the weight's own, or, for a weight FSDP gathered back into a plain tensor, its quant state's and the module's
    ``quant_storage`` (``quant_state_of``). bitsandbytes' own reattachment leaves a ``Params4bit`` with its constructor
    defaults (fp4, blocksize 64, double quant) and no ``module``, whatever the state says, so a ``Params4bit`` without
    ``module`` is read through its state too."""
    w = layer.weight
    if isinstance(w, bnb.nn.Params4bit) and getattr(w, "module", None) is not None:
        return {"blocksize": w.blocksize, "compress_statistics": w.compress_statistics, "quant_type": w.quant_type,
                "quant_storage": w.quant_storage}
    qs = quant_state_of(layer)
    return {"blocksize": qs.blocksize, "compress_statistics": double_quant_of(layer), "quant_type": qs.quant_type,
            "quant_storage": layer.quant_storage}


def requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight by ``weight`` quantized with the layer's original settings.

    4-bit: quant type, blocksize, double quant (compress_statistics), quant storage and the
    original weight dtype are kept (``quant_state.dtype`` is the dtype bitsandbytes quantized
    from, so the new weight is cast to it first; ``weight_dtype_of`` for a repacked layer). The new weight is in
    the standard layout: a layer that repacks does so again on its next eval-mode forward. 8-bit:
    ``has_fp16_weights`` and the layer's ``MatmulLtState`` (threshold etc.) are kept; its cached statistics are
    reset so the next forward reads the new ones (with ``has_fp16_weights`` the new weight is stored as float16, as
    bitsandbytes keeps it, and quantized by the next forward; without the reset an eval-mode forward would multiply
    by the statistics cached from the old weight).
    """
    require_quantized(layer)
    device = layer.weight.device
    if bits_of(layer) == 4:
        data = weight.detach().to(dtype=weight_dtype_of(layer), device="cpu").contiguous()
        new = bnb.nn.Params4bit(data, requires_grad=False, module=layer, **params4bit_settings(layer))
        layer.weight = new.to(device)
    else:
        if has_fp16_weights(layer):
            # built where it lives: bitsandbytes 0.50.2 ``Int8Params._quantize`` returns ``super().to(device)`` for a
            # float16 weight, a plain tensor no module takes as its parameter (xfails/bitsandbytes.ini
            # int8-fp16-weights-to-device)
            data = weight.detach().to(dtype=torch.float16, device=device).contiguous()
            layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=True)
        else:
            data = weight.detach().to(dtype=torch.float16, device="cpu").contiguous()
            new = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
            layer.weight = new.to(device)
        layer.state.reset_grads()


@dataclass(frozen=True)
class LayerSnapshot:
    """Everything that defines a quantized base layer's weights, copied bit for bit."""

    tensors: dict[str, torch.Tensor]

    def differences(self, other: LayerSnapshot) -> list[str]:
        """Names of the entries whose bytes differ (empty when bit-identical)."""
        out = []
        for key in sorted(set(self.tensors) | set(other.tensors)):
            a, b = self.tensors.get(key), other.tensors.get(key)
            if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                out.append(key)
            elif not torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                                 b.view(torch.uint8) if b.dtype != torch.bool else b):
                out.append(key)
        return out


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).clone() if t.numel() else t.reshape(-1).clone()


def snapshot(layer: nn.Module) -> LayerSnapshot:
    """Copy the packed weight, every quantization statistic and the bias, as raw bytes. An 8-bit layer with
    ``has_fp16_weights`` is defined by its float16 weight alone (its statistics are computed from it: no SCB)."""
    t: dict[str, torch.Tensor] = {"weight": _flat_bytes(layer.weight.data)}
    if getattr(layer, "bias", None) is not None:
        t["bias"] = _flat_bytes(layer.bias.data)
    if bits_of(layer) == 4:
        qs = quant_state_of(layer)
        for key, value in qs.as_dict(packed=False).items():
            if isinstance(value, torch.Tensor):
                t[f"quant_state.{key}"] = _flat_bytes(value)
            else:
                t[f"quant_state.{key}"] = _flat_bytes(torch.tensor(list(str(value).encode()), dtype=torch.uint8))
    elif not has_fp16_weights(layer):
        t["SCB"] = _flat_bytes(scb_of(layer))
    return LayerSnapshot(t)


def quant_settings(layer: nn.Module) -> dict[str, Any]:
    """Every setting that defines a quantized base, which a requantization must keep: the validity record the merge
    clauses, the stateful machine and ``quant.validate`` compare, and what messages and reports show.

    4-bit: quant type, blocksize, double quant (the weight's ``compress_statistics`` and the quant state's own
    ``nested``, ``double_quant_of``), quant storage, the dtype it was quantized from (``weight_dtype_of``) and the
    compute dtype. 8-bit (bitsandbytes 0.50.2 ``nn/modules.py Linear8bitLt``): the weight's ``has_fp16_weights``
    (``Int8Params``) and the layer's ``MatmulLtState`` settings its forward reads, ``threshold`` and
    ``has_fp16_weights`` (``autograd/_functions.py``), each on its own: a requantization that rebuilds one and not
    the other leaves them disagreeing."""
    if bits_of(layer) == 4:
        w = layer.weight
        qs = getattr(w, "quant_state", None)
        return {
            "bits": 4,
            "quant_type": w.quant_type,
            "blocksize": w.blocksize,
            "double_quant": bool(w.compress_statistics),
            "state_double_quant": None if qs is None else double_quant_of(layer),
            "quant_storage": str(w.quant_storage),
            "weight_dtype": str(weight_dtype_of(layer)),
            "compute_dtype": str(layer.compute_dtype),
        }
    # read from the layer as it is now: a merge that put in a weight of another kind shows as a changed setting
    state = getattr(layer, "state", None)
    return {"bits": 8, "has_fp16_weights": getattr(layer.weight, "has_fp16_weights", None),
            "threshold": getattr(state, "threshold", None),
            "state_has_fp16_weights": getattr(state, "has_fp16_weights", None)}


def bias_dtype_for(bits: int, compute_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``make_base_layer`` stores the bias in: the checkpoint's (``weight_dtype``), else the compute dtype
    (4-bit) or float16 (8-bit)."""
    return weight_dtype or (compute_dtype if bits == 4 else torch.float16)


def make_base_layer(
    in_features: int,
    out_features: int,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype | None = None,
    bias: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    threshold: float = 0.0,
    cpu_packed: bool = False,
    has_fp16_weights: bool = False,
    device: str | torch.device = "cpu",
    weight: torch.Tensor | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build and quantize a bitsandbytes layer from a float weight (random normal by default).

    The suites build every base layer through this one function, so a case is fully
    described by these arguments (OpInfo style). ``weight_dtype`` is the storage dtype of the
    checkpoint (what ``from_pretrained(torch_dtype=...)`` leaves): 4-bit quantizes from it (it becomes
    ``quant_state.dtype``, what a dequantize returns) and the bias is stored in it; None: a float32
    weight, the bias in the compute dtype (4-bit) or float16 (8-bit). ``cpu_packed``: the 4-bit layer keeps
    bitsandbytes' CPU packed layout switched on, as every CPU user with AVX512-BF16 gets it (it repacks on its
    first eval-mode forward whose input needs no grad); off, it stays in the standard layout, as on CUDA.
    ``quant_storage``: the dtype the 4-bit payload is stored as (FSDP-QLoRA loads with bfloat16, transformers'
    ``bnb_4bit_quant_storage``); the same packed bytes, viewed as that dtype. ``threshold``: the 8-bit LLM.int8()
    outlier threshold (transformers' ``llm_int8_threshold`` loads with 6.0): input columns holding a value of at
    least that size are multiplied in the input's dtype, the rest in int8. ``has_fp16_weights``: the 8-bit layer
    keeps its weight in float16 and bitsandbytes quantizes it at each forward (its default, LitGPT's int8 training
    mode); the weight is built frozen (``requires_grad=False``), as an adapter's base is.
    ``PackedLayoutUnavailable`` where that layout does not exist (another device, a CPU without AVX512-BF16).
    """
    if cpu_packed:
        if bits != 4:
            raise PackedLayoutUnavailable("bitsandbytes' CPU packed layout exists for 4-bit layers only; "
                                          "build an 8-bit base with cpu_packed=False")
        if torch.device(device).type != "cpu" or not cpu_packed_layout_available():
            where = (f"device {device}" if torch.device(device).type != "cpu" else
                     "bitsandbytes reports no AVX512-BF16: the CPU lacks it, or its CUDA library is loaded")
            raise PackedLayoutUnavailable(f"bitsandbytes' CPU packed layout does not exist here ({where}); "
                                          "build the base with cpu_packed=False")
    gen = torch.Generator().manual_seed(seed)
    if weight is None:
        weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    if weight.shape != (out_features, in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({out_features}, {in_features})")
    b = torch.randn(out_features, generator=gen) * 0.1 if bias else None
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage,
        )
        # bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks the weight on the first eval-mode,
        # no-grad forward (``_convert_weight_packed_for_cpu``): absmax becomes bfloat16, the packed
        # layout is no longer what ``dequantize_4bit`` reads (``standard_layout`` reads it), and
        # out_features % 32 != 0 asserts. The base case's ``cpu_packed`` axis decides.
        layer.support_avx512bf16_for_cpu = bool(cpu_packed)
        layer.weight = bnb.nn.Params4bit(
            weight.to(weight_dtype or torch.float32), requires_grad=False, blocksize=blocksize,
            compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage, module=layer,
        )
    elif bits == 8:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=has_fp16_weights,
                                    threshold=threshold)
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False,
                                         has_fp16_weights=has_fp16_weights)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if b is not None:
        layer.bias = nn.Parameter(b.to(bias_dtype_for(bits, compute_dtype, weight_dtype)), requires_grad=False)
    layer = layer.to(device)
    return layer


def clone_layer(layer: nn.Module) -> nn.Module:
    """An independent copy of a quantized layer (deep copy keeps the packed bytes and state)."""
    return copy.deepcopy(layer)
