"""Case matrices: the data the checks iterate (torch OpInfo style). One place, imported everywhere.

A ``BaseCase`` describes a quantized base layer (device-independent), an ``AdapterCase`` the adapter put
on it: the one case record. The clauses build bases through ``ctx.make_base(case)``; composites hold one
of each plus their own input layout: ``GradCase`` (one forward/backward of the backprop matrix, sampled
with ``pairwise``), the clone probe's ``ProbeCase`` (``conformance.probe.clone``), the stateful machine's
``MachineConfig`` (``conformance.clauses.stateful.config``) and the benchmarks' ``BenchCase``
(``conformance.bench.cases``). Hypothesis strategies in ``conformance.clauses.strategies`` draw from the
same value lists, so widening a list here widens every suite. The clauses that stand on the base-layer
settings take their bases from one factor table per bit width (``BASE_AXES``, validity rules in
``base_invalid``): ``base_matrix`` covers every pair of values (the default tier) or gives the full product
(the slow tier, ``CheckContext.base_matrix``). ``fill_adapter`` / ``set_skew_norm`` put the seeded adapter
values of a case into a layer."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from conformance.numerics import cayley
from conformance.numerics.grads import BASE as BASE  # re-exported: adapter_names entry of the base alone
from conformance.quant import layers as qlayers
from conformance.quant.torchnames import dtype_name, dtype_of

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the float weight handed to bitsandbytes
# the storage dtype of a base (the checkpoint's ``from_pretrained(torch_dtype=...)``), separate from the compute dtype
STORAGE_DTYPES = WEIGHT_DTYPES
#: the dtype a 4-bit payload is stored as (``Params4bit.quant_storage``): bitsandbytes' uint8, FSDP-QLoRA's floats
QUANT_STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
SHAPES = ((64, 48), (48, 64), (64, 64), (96, 40))  # (in_features, out_features): square and not
ORIENTATION_SHAPES = (SHAPES[0], SHAPES[2])  # clauses whose delta/rotation orientation matters: non-square, square
RANKS = (1, 4, 8)
ALPHAS = (1.0, 8.0, 16.0)
OFT_BLOCK_SIZES = (4, 8, 16)
OFT_SKEW_NORMS = (0.1, 1.0, 4.0)  # ||Q||_2 per block: small, moderate, large rotations
OFT_IN_FEATURES = 64  # the OFT rotation clauses' base layer (every OFT_BLOCK_SIZES entry divides it)
NEUMANN_TERMS = tuple(range(2, 9))
NEUMANN_BLOCK_SIZE = 8
COFT_BLOCK_SIZES = (8, 16)
INPUT_LEADS = ((), (3,), (2, 3))  # leading dims of forward inputs: 1-D, 2-D, 3-D
POISONS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}  # what a broken adapter holds

# the backprop matrix (BACKPROP-* clauses and the clone probe)
GRAD_IN_FEATURES, GRAD_OUT_FEATURES = 64, 48
GRAD_BATCH_SIZES = (1, 3)
GRAD_INPUT_RANKS = (1, 2, 3)
GRAD_SEQ_LEN = 2
GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRAD_QUANTS = ((4, "nf4"), (4, "fp4"), (8, "int8"))  # (bits, quant type); 8-bit has no quant type
MIXED_BATCH_SIZE = 4
MIXED_INPUT_RANKS = (2, 3)


@dataclass(frozen=True)
class BaseCase:
    """A quantized base layer, device-independent: the one description every case builds its base from.

    The clauses (``ctx.make_base(case)``), the backprop matrix (:class:`GradCase`), the clone probe, the
    stateful machine and the benchmarks all hold one. Every field is a keyword argument of
    ``quant.make_base_layer`` (:meth:`layer_kwargs`), so a new base-layer axis is a field here with its
    default (and that argument there); the JSON form (:meth:`to_json`) follows the fields.
    """

    bits: int
    in_features: int = 64
    out_features: int = 48
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    bias: bool = True
    #: storage dtype (``quant.make_base_layer``'s ``weight_dtype``); None: float32 weight, today's bias dtype
    weight_dtype: torch.dtype | None = None
    #: the dtype the 4-bit payload is stored as (``bnb_4bit_quant_storage``); None: uint8, bitsandbytes' default
    quant_storage: torch.dtype | None = None
    #: the 8-bit outlier threshold (``llm_int8_threshold``; transformers loads with 6.0); 0.0: int8 throughout
    threshold: float = 0.0
    #: bitsandbytes' CPU packed layout switched on (4-bit on a CPU with AVX512-BF16: it repacks on the first
    #: eval-mode forward whose input needs no grad); off: the standard layout, as on CUDA
    cpu_packed: bool = False
    #: 8-bit: the weight kept in float16 and quantized by bitsandbytes at each forward (``Int8Params.has_fp16_weights``,
    #: bitsandbytes' default and LitGPT's int8 training mode); False: int8 storage, what transformers loads
    has_fp16_weights: bool = False

    #: fields a bit width does not have (``make_base_layer`` ignores them; they are left out of its arguments)
    FOUR_BIT_ONLY: ClassVar[tuple[str, ...]] = ("quant_type", "blocksize", "double_quant", "quant_storage", "cpu_packed")

    def layer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``quant.make_base_layer`` besides the shape (no device, no seed)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("in_features", "out_features")}
        for optional in ("weight_dtype", "quant_storage"):
            if d.get(optional, 0) is None:
                d.pop(optional)
        if self.bits == 8:
            for k in self.FOUR_BIT_ONLY:
                d.pop(k, None)
        else:
            d.pop("threshold")
            d.pop("has_fp16_weights")
        return d

    def unavailable(self, device: str | torch.device = "cpu") -> str | None:
        """Why this base cannot be built on ``device`` (None when it can): the CPU packed layout exists only on
        a CPU whose bitsandbytes has AVX512-BF16."""
        if not self.cpu_packed:
            return None
        if torch.device(device).type != "cpu":
            return f"bitsandbytes' CPU packed layout does not exist on {torch.device(device).type}"
        if not qlayers.cpu_packed_layout_available():
            return ("bitsandbytes' CPU packed layout does not exist here (bitsandbytes reports no AVX512-BF16: the CPU "
                    "lacks it, or bitsandbytes loaded its CUDA library)")
        return None

    @property
    def cpu_pack_refusal(self) -> str | None:
        """Why bitsandbytes cannot repack this base (``quant.layers.cpu_packed_shape_refusal``); None when it can
        or the layout is off."""
        if not self.cpu_packed:
            return None
        return qlayers.cpu_packed_shape_refusal(self.in_features, self.out_features, self.blocksize)

    def build(self, device: str | torch.device = "cpu", *, seed: int = 0, weight: torch.Tensor | None = None
              ) -> nn.Module:
        """The quantized layer on ``device`` (``seed`` draws its float weight and bias unless ``weight`` is given)."""
        return qlayers.make_base_layer(self.in_features, self.out_features, device=device, seed=seed, weight=weight,
                                       **self.layer_kwargs())

    @property
    def bias_dtype(self) -> torch.dtype:
        """The dtype the built layer's bias is stored in (``quant.layers.bias_dtype_for``)."""
        return qlayers.bias_dtype_for(self.bits, self.compute_dtype, self.weight_dtype)

    @property
    def quant_label(self) -> str:
        """``int8``, or the 4-bit quant type with ``-dq`` for double quantization (``nf4-dq``)."""
        if self.bits == 8:
            return "int8"
        return self.quant_type + ("-dq" if self.double_quant else "")

    @property
    def shape_label(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    @property
    def label(self) -> str:
        dt = dtype_name(self.compute_dtype)
        if self.weight_dtype is not None:
            dt += "-stored-" + dtype_name(self.weight_dtype)
        if self.bits == 8:
            return (f"int8-{self.shape_label}-{dt}" + (f"-threshold{self.threshold:g}" if self.threshold else "")
                    + ("-fp16w" if self.has_fp16_weights else ""))
        qs = f"-qs-{dtype_name(self.quant_storage)}" if self.quant_storage is not None else ""
        return f"{self.quant_label}-b{self.blocksize}-{self.shape_label}-{dt}{qs}" + ("-cpupacked" if self.cpu_packed else "")

    def to_json(self) -> dict[str, Any]:
        """Every field, dtypes as names (``"bfloat16"``)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BaseCase:
        """The case of a :meth:`to_json` dict (keys that are not fields are ignored; missing ones take the default)."""
        kw = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = dtype_of(v) if "torch.dtype" in str(f.type) and v is not None else v
        return cls(**kw)


def _json_value(v: Any) -> Any:
    return dtype_name(v) if isinstance(v, torch.dtype) else v


def _from_base(name: str, doc: str = "") -> property:
    return property(lambda self: getattr(self.base, name), doc=doc or f"``base.{name}``")


class OnBase:
    """Read-only views of ``self.base`` (a ``BaseCase``) for the records that hold one besides fields of their own
    (the clone probe's ``ProbeCase``, the benchmarks' ``BenchCase``, the stateful ``MachineConfig``)."""

    base: BaseCase
    bits = _from_base("bits")
    in_features = _from_base("in_features")
    out_features = _from_base("out_features")
    quant_type = _from_base("quant_type")
    double_quant = _from_base("double_quant")
    bias = _from_base("bias")
    quant = _from_base("quant_label", "nf4 / fp4 / int8")

    @property
    def dtype(self) -> str:
        """The compute dtype's name (``bfloat16``)."""
        return dtype_name(self.base.compute_dtype)


@dataclass(frozen=True)
class AdapterCase:
    """An adapter put on a base: the method and its parameters (PEFT's config keys)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + "".join(f"-{k}={v}" for k, v in sorted(self.params.items()))

    def with_params(self, **params: Any) -> AdapterCase:
        """This adapter with ``params`` changed or added."""
        return AdapterCase(self.method, {**self.params, **params})


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


#: transformers' ``BitsAndBytesConfig(llm_int8_threshold=6.0)`` default, the LLM.int8() paper's outlier threshold
INT8_THRESHOLD = 6.0
#: the 8-bit threshold axis: int8 throughout, LLM.int8()'s outlier decomposition (the base matrix, the backprop one)
INT8_THRESHOLDS = (0.0, INT8_THRESHOLD)


def fp16_weight_cases(bits: int) -> list[BaseCase]:
    """8-bit bases with ``has_fp16_weights`` (the float16 weight quantized at each forward), one per compute dtype,
    the outlier threshold off and on (``INT8_THRESHOLD``) alternating, non-square and square (4-bit: none). Inputs of
    the threshold cases need outlier columns (``with_outliers``), as for ``outlier_cases``."""
    if bits != 8:
        return []
    return [BaseCase(8, *ORIENTATION_SHAPES[i % 2], compute_dtype=d, threshold=INT8_THRESHOLD if i % 2 else 0.0,
                     has_fp16_weights=True) for i, d in enumerate(COMPUTE_DTYPES)]


def with_outliers(x: torch.Tensor, threshold: float, columns: Sequence[int] = (3, 17)) -> torch.Tensor:
    """``x`` with LLM.int8()-style outlier features: the given input columns scaled so that every row holds a value
    of 1.5 x ``threshold`` there (its sign kept), what the outlier decomposition exists for."""
    x = x.clone()
    cols = list(columns)
    x[..., cols] = torch.where(x[..., cols] >= 0, 1.0, -1.0).to(x.dtype) * (1.5 * threshold)
    return x


def with_storage_dtypes(bases: Sequence[BaseCase]) -> list[BaseCase]:
    """``bases`` with the storage-dtype axis combined in (not a product): case ``i`` gets
    ``STORAGE_DTYPES[(i + i // 3) % 3]``, so over a list ordered by compute dtype (``base_cases``) every
    run of nine consecutive cases meets every (compute dtype, storage dtype) pair."""
    n = len(STORAGE_DTYPES)
    return [replace(c, weight_dtype=STORAGE_DTYPES[(i + i // n) % n]) for i, c in enumerate(bases)]


# -- the base-layer matrix: one factor table per bit width -------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """One factor of the base-layer matrix: a ``BaseCase`` field (``shape``: in_features and out_features together)
    and the values it takes. ``split``: a factor whose other values cannot exist on every device (the CPU packed
    layout: ``BaseCase.unavailable``); its first value alone covers every pair of the other factors, so a device
    that skips the rest loses no pair of them (``base_matrix``)."""

    name: str
    values: tuple[Any, ...]
    split: bool = False


#: the base-layer axes of each bit width and their values (from the value lists above). A new axis is one line
#: here (its ``BaseCase`` field, with the default its cases had before) plus, if it rules combinations out, one rule
#: in ``base_invalid``.
BASE_AXES: Mapping[int, tuple[Axis, ...]] = {
    4: (
        Axis("shape", SHAPES[:3]),  # non-square both ways and square
        Axis("quant_type", QUANT_TYPES),
        Axis("blocksize", BLOCKSIZES),
        Axis("double_quant", (False, True)),
        Axis("compute_dtype", COMPUTE_DTYPES),
        Axis("weight_dtype", (None, *STORAGE_DTYPES)),  # None: a float32 weight, the bias in the compute dtype
        Axis("quant_storage", (None, *QUANT_STORAGES[1:])),  # None: uint8, bitsandbytes' default
        Axis("cpu_packed", (False, True), split=True),
    ),
    8: (
        Axis("shape", SHAPES[:3]),
        Axis("compute_dtype", COMPUTE_DTYPES),
        Axis("weight_dtype", (None, *STORAGE_DTYPES)),  # None: a float32 weight, a float16 bias
        Axis("threshold", INT8_THRESHOLDS),  # 6.0: inputs carry outlier columns (``with_outliers``)
        Axis("has_fp16_weights", (False, True)),  # True: a float16 weight, quantized at each forward
    ),
}


def base_invalid(bits: int, combo: Mapping[str, Any], *, merges: bool = False) -> str | None:
    """Why a combination of ``BASE_AXES[bits]`` values is no case (None when it is one): the validity rules of the
    base-layer matrix, in one place.

    - the CPU packed layout only exists for shapes bitsandbytes repacks (``BaseCase.cpu_pack_refusal``: out_features
      a multiple of 32, in_features of the blocksize);
    - ``merges``: the clause requantizes the base and compares weights, which bitsandbytes 0.50.2's CPU
      ``dequantize_4bit`` gets right only for ``in_features % blocksize == 0`` (``strategies.cpu_blocksize_ok``).
    """
    if bits != 4:
        return None
    in_features, out_features = combo["shape"]
    if combo.get("cpu_packed"):
        why = qlayers.cpu_packed_shape_refusal(in_features, out_features, combo["blocksize"])
        if why is not None:
            return f"CPU packed layout: {why}"
    if merges and in_features % combo["blocksize"]:
        return (f"merges: in_features {in_features} is not a multiple of the blocksize {combo['blocksize']} "
                "(bitsandbytes 0.50.2's CPU dequantize_4bit)")
    return None


def base_case_of(bits: int, combo: Mapping[str, Any]) -> BaseCase:
    """The ``BaseCase`` of one combination of ``BASE_AXES[bits]`` values."""
    kw = {k: v for k, v in combo.items() if k != "shape"}
    in_features, out_features = combo["shape"]
    return BaseCase(bits, in_features, out_features, **kw)


def _combos(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    return [dict(zip((a.name for a in axes), vs)) for vs in itertools.product(*(a.values for a in axes))]


@functools.cache
def _matrix(bits: int, full: bool, merges: bool, strength: int, pinned: tuple[tuple[str, Any], ...]
            ) -> tuple[BaseCase, ...]:
    if bits not in BASE_AXES:
        raise ValueError(f"no base-layer axes for {bits}-bit layers; the bit widths are {sorted(BASE_AXES)}")
    names = [a.name for a in BASE_AXES[bits]]
    unknown = sorted(k for k, _ in pinned if k not in names)
    if unknown:
        raise ValueError(f"pinned {unknown}: no such {bits}-bit axis; the axes are {names} (cases.BASE_AXES)")
    pins = dict(pinned)
    axes = [replace(a, values=(pins[a.name],)) if a.name in pins else a for a in BASE_AXES[bits]]

    def valid(c: dict[str, Any]) -> bool:
        return base_invalid(bits, c, merges=merges) is None

    if full:
        return tuple(base_case_of(bits, c) for c in _combos(axes) if valid(c))
    # the cases every device builds first: every split axis at its first value; then each other value of a split
    # axis, with every value of the rest (``Axis.split``)
    runs = [[replace(a, values=a.values[:1]) if a.split else a for a in axes]]
    for a in (a for a in axes if a.split):
        runs += [[replace(b, values=(v,)) if b is a else replace(b, values=b.values[:1]) if b.split else b
                  for b in axes] for v in a.values[1:]]
    return tuple(base_case_of(bits, c) for run in runs
                 for c in pairwise({b.name: b.values for b in run}, valid, strength=strength))


def base_matrix(bits: int, *, full: bool = False, merges: bool = False, strength: int = 2,
                pinned: Mapping[str, Any] | None = None) -> list[BaseCase]:
    """The base layers of ``BASE_AXES[bits]``: a covering of every pair of values (``pairwise``; the default tier)
    or the full product (``full``; the slow tier), without the combinations ``base_invalid`` rules out (``merges``:
    those a requantizing clause cannot use on the CPU).

    A split axis (the CPU packed layout) is covered separately: the cases at its first value cover every pair of
    the other axes by themselves, so a device where its other values cannot exist (those cases skip:
    ``BaseCase.unavailable``) still meets every pair of the rest. ``strength=1``: every value once instead of every
    pair (clauses whose cases are expensive: compile). ``pinned``: axes held at one value (``{"cpu_packed": False}``).
    Deterministic; 8-bit cases at threshold 6.0 need inputs with outlier columns (``with_outliers``)."""
    return list(_matrix(bits, full, merges, strength, tuple(sorted((pinned or {}).items()))))


def adapter_cases(method: str) -> list[AdapterCase]:
    """Non-trivial adapters (random B / non-identity R), with alpha != r and rsLoRA/COFT/Neumann variants.

    The first entry of each method is the plain one many clauses take; LoRA's last one has ``lora_bias``
    (the forward and backprop oracles run it; an implementation without the capability skips it)."""
    if method == "lora":
        return [
            AdapterCase("lora", {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}),
            AdapterCase("lora", {"r": 8, "lora_alpha": 8.0, "init_lora_weights": False, "use_rslora": True}),
            AdapterCase("lora", {"r": 4, "lora_alpha": 8.0, "init_lora_weights": False, "lora_bias": True}),
        ]
    if method == "oft":
        return [
            AdapterCase("oft", {"r": 4, "oft_block_size": 0, "init_weights": False}),
            AdapterCase("oft", {"r": 0, "oft_block_size": 8, "init_weights": False, "block_share": True}),
        ]
    if method == "dora":  # LoRA's, without lora_bias (DoRA refuses it); make_layer moves the magnitude off the norm
        return [
            AdapterCase("dora", {"r": 4, "lora_alpha": 16.0, "init_lora_weights": False}),
            AdapterCase("dora", {"r": 8, "lora_alpha": 8.0, "init_lora_weights": False, "use_rslora": True}),
        ]
    raise ValueError(f"unknown method {method!r}")


#: the magnitude vector's canonical name in ``adapter_parameters`` (``conformance.numerics.dora.MAGNITUDE``)
DORA_MAGNITUDE = "lora_magnitude_vector.weight"
#: a "trained" DoRA magnitude is the initial one (the row norms) times a factor drawn uniformly from this range
DORA_MAGNITUDE_SPREAD = (0.5, 1.5)


def trained_magnitude(layer: Any, name: str, generator: torch.Generator) -> None:
    """Move DoRA adapter ``name``'s magnitude off its initial value, as training would: each entry times a factor in
    ``DORA_MAGNITUDE_SPREAD``. A fresh DoRA adapter has ``m = ||W0 + s B A||_c``, i.e. the factor ``m/n`` is 1 up to
    rounding, and a wrong norm, or a merge that leaves the magnitude out, would go unseen. In place, through the
    implementation's own parameter (``adapter_parameters``)."""
    m = layer.adapter_parameters(name)[DORA_MAGNITUDE]
    lo, hi = DORA_MAGNITUDE_SPREAD
    factor = lo + (hi - lo) * torch.rand(m.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        m.copy_((m.detach().double().cpu() * factor).to(m.dtype))


# -- the backprop matrix ------------------------------------------------------------------------

@dataclass(frozen=True)
class GradCase:
    """One forward/backward: a base case, an adapter case, the input layout, and (mixed batch) the second adapter."""

    base: BaseCase
    adapter: AdapterCase
    rank: int
    batch: int
    x_requires_grad: bool
    mixed: bool = False
    second: AdapterCase | None = field(default=None, compare=False)

    @property
    def method(self) -> str:
        return self.adapter.method

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the input's)."""
        return self.base.compute_dtype

    def input_shape(self) -> tuple[int, ...]:
        return grad_input_shape(self.rank, self.batch)

    def with_outliers(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with outlier columns (``with_outliers``) when the base has an 8-bit threshold, else ``x``."""
        return with_outliers(x, self.base.threshold) if self.base.threshold else x

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.input_shape()))
        grad = "xgrad" if self.x_requires_grad else "xnograd"
        mixed = "-mixed" if self.mixed else ""
        return f"{self.adapter.label}/{self.base.label}/in{shape}-{grad}{mixed}"


def grad_base(bits: int, quant_type: str, dtype: torch.dtype, *, weight_dtype: torch.dtype | None = None,
              out_features: int = GRAD_OUT_FEATURES, threshold: float = 0.0) -> BaseCase:
    """The base of a backprop-matrix case (in_features ``GRAD_IN_FEATURES``; ``quant_type`` from ``GRAD_QUANTS``;
    ``threshold``: the 8-bit outlier threshold)."""
    return BaseCase(bits, GRAD_IN_FEATURES, out_features, quant_type=quant_type if bits == 4 else "nf4",
                    compute_dtype=dtype, weight_dtype=weight_dtype, threshold=threshold)


def grad_input_shape(rank: int, batch: int) -> tuple[int, ...]:
    """The input of a backprop case: (in,), (batch, in) or (batch, seq, in)."""
    if rank == 1:
        return (GRAD_IN_FEATURES,)
    if rank == 2:
        return (batch, GRAD_IN_FEATURES)
    return (batch, GRAD_SEQ_LEN, GRAD_IN_FEATURES)


def pairwise(factors: Mapping[str, Sequence[Any]], valid: Callable[[dict[str, Any]], bool] | None = None,
             *, strength: int = 2) -> list[dict[str, Any]]:
    """Deterministic all-pairs covering of a cross product (greedy, first-best in product order).

    Every pair of values of two factors that occurs in some valid combination occurs in a chosen
    one; a handful of cases instead of the full product (Cohen et al., AETG, 1997). ``strength=1``:
    every value of every factor that occurs in some valid combination occurs in a chosen one.
    """
    if strength not in (1, 2):
        raise ValueError(f"pairwise covers single values (strength=1) or pairs (strength=2), not {strength}")
    names = list(factors)
    full = [dict(zip(names, combo)) for combo in itertools.product(*factors.values())]
    full = [c for c in full if valid is None or valid(c)]

    def pairs(c: dict[str, Any]) -> set[tuple[str, Any, str, Any]]:
        if strength == 1:
            return {(a, repr(c[a]), "", "") for a in names}
        return {(a, repr(c[a]), b, repr(c[b])) for i, a in enumerate(names) for b in names[i + 1:]}

    uncovered: set[tuple[str, Any, str, Any]] = set().union(*(pairs(c) for c in full)) if full else set()
    chosen: list[dict[str, Any]] = []
    while uncovered:
        best = max(full, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def quants_for(bits: Sequence[int]) -> list[tuple[int, str]]:
    """The ``GRAD_QUANTS`` entries of the given bit widths."""
    return [q for q in GRAD_QUANTS if q[0] in bits]


def grad_matrix(method: str, bits: Sequence[int], *, mixed: bool = False) -> list[GradCase]:
    """The sampled matrix of the BACKPROP clauses (pairwise over every factor), one method. The 8-bit threshold
    (``INT8_THRESHOLDS``) is a factor of the 8-bit cases; a case at 6.0 takes inputs with outlier columns
    (``GradCase.with_outliers``)."""
    adapters = adapter_cases(method)
    factors: dict[str, Sequence[Any]] = {
        "quant": quants_for(bits), "dtype": GRAD_DTYPES, "rank": MIXED_INPUT_RANKS if mixed else GRAD_INPUT_RANKS,
        "batch": (MIXED_BATCH_SIZE,) if mixed else GRAD_BATCH_SIZES, "xgrad": (True, False),
        "adapter": range(len(adapters)), "stored": STORAGE_DTYPES,
        "out": tuple(o for i, o in ORIENTATION_SHAPES if i == GRAD_IN_FEATURES),
        "threshold": INT8_THRESHOLDS if 8 in bits else INT8_THRESHOLDS[:1],
    }

    def valid(c: dict[str, Any]) -> bool:
        return (c["rank"] > 1 or c["batch"] == 1) and (c["threshold"] == 0.0 or c["quant"][0] == 8)

    out = []
    for c in pairwise(factors, valid=valid):
        (b, qt), a = c["quant"], c["adapter"]
        base = grad_base(b, qt, c["dtype"], weight_dtype=c["stored"], out_features=c["out"], threshold=c["threshold"])
        out.append(GradCase(base, adapters[a], c["rank"], c["batch"], c["xgrad"], mixed,
                            second=adapters[(a + 1) % len(adapters)] if mixed else None))
    return out


# -- adapter values of a case ------------------------------------------------------------------

def fill_adapter(layer: nn.Module, name: str, gen: torch.Generator, *, scale: float = 1.0) -> None:
    """Overwrite an adapter's tensors (read through ``adapter_parameters``) with seeded random values.

    LoRA: ``A ~ N(0, 1/in)``, ``B ~ N(0, 1/r) * 0.2 * scale``, ``b_B ~ N(0, 0.01)``; OFT: the
    upper-triangle parameters ``~ N(0, 0.05 * scale)``. Checks use it so that the adapter is
    non-trivial whatever the implementation's own initialisation is.
    """
    tensors = layer.adapter_parameters(name)
    with torch.no_grad():
        for key, p in tensors.items():
            if key == "lora_A.weight":
                v = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            elif key == "lora_B.weight":
                v = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5 * 0.2 * scale
            elif key == "lora_B.bias":
                v = torch.randn(p.shape, generator=gen) * 0.1
            elif key == "oft_R.weight":
                v = torch.randn(p.shape, generator=gen) * 0.05 * scale
            else:
                continue
            p.copy_(v.to(device=p.device, dtype=p.dtype))


def set_skew_norm(layer: nn.Module, name: str, block_size: int, norm2: float, gen: torch.Generator) -> float:
    """Random OFT parameters scaled so every block's ``||Q||_2`` equals ``norm2``; returns the largest
    ``||Q||_2`` of what the layer stores (after rounding to its dtype)."""
    p = layer.adapter_parameters(name)["oft_R.weight"]
    v = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    s = torch.linalg.matrix_norm(cayley.skew(v, block_size), ord=2)
    v = v * (norm2 / s)[:, None]
    with torch.no_grad():
        p.copy_(v.to(device=p.device, dtype=p.dtype))
    q = cayley.skew(p.detach().double().cpu(), block_size)
    return float(torch.linalg.matrix_norm(q, ord=2).max())
