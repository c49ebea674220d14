"""The suite's closed vocabulary: adapter methods, capabilities, and what an implementation declares.

Modelled on scikit-learn's typed tags (``sklearn/utils/_tags.py``: tags as dataclasses, a missing or
unknown tag is an error) and its one place that decides what applies (``estimator_checks.py``):

- ``Method``: the adapter methods the suite knows: ``lora``, ``oft``, ``dora`` with hand oracles (``ORACLE_METHODS``),
  and the methods judged against their dense twin (``TWIN_METHODS``; ``conformance.core.methods`` has their table).
- ``Capability``: what an implementation may promise besides its methods, each documented in ``DOCS``
  (and, for the layer's optional operations and parameters, where the promise lives in ``LAYER_API``).
- ``PARAM_CAPABILITIES``: the adapter parameters whose use needs a capability (``params_needing``).
- ``Declaration``: an implementation's methods, capabilities and ``limitations`` (a capability that does
  not hold for some methods, each with a reason), read once from the implementation object by
  ``Declaration.of``; a misspelled name is an ``UnknownName`` error naming the valid ones.

Both enums are ``str``-valued: a member equals its string, serializes as it, and formats as it
(``f"{Method.LORA}"`` is ``lora``), so reports and messages read as before. The spec side converts every
name it is given (a clause's ``requires``, a stateful op's ``needs``, ``ctx.has(...)``) with ``capability``
or ``method`` below, so a misspelling fails where it is written.

Standard library only (no torch): the torch-free CLI and nox's interpreter import it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class NamedEnum(str, enum.Enum):
    """A closed set of names: a member equals, prints and formats as its string (``f"{Method.LORA}"`` is ``lora``)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Method(NamedEnum):
    """An adapter method the suite has a yardstick for (``AdapterSpec.method``)."""

    LORA = "lora"  #: LoRA (Hu et al., arXiv:2106.09685; PEFT ``src/peft/tuners/lora``)
    OFT = "oft"  #: OFT (Qiu et al., arXiv:2306.07280; PEFT ``src/peft/tuners/oft``)
    DORA = "dora"  #: DoRA (Liu et al., arXiv:2402.09353; PEFT ``LoraConfig(use_dora=True)``, ``src/peft/tuners/lora/dora.py``)
    # judged against their dense twin only (``conformance.core.methods.TABLE``: config, twin rule, sources)
    ADALORA = "adalora"  #: AdaLoRA (Zhang et al., arXiv:2303.10512; PEFT ``src/peft/tuners/adalora``)
    HIRA = "hira"  #: HiRA (Huang et al., ICLR 2025; PEFT ``src/peft/tuners/hira``)
    IA3 = "ia3"  #: (IA)^3 (Liu et al., arXiv:2205.05638; PEFT ``src/peft/tuners/ia3``)
    PVERA = "pvera"  #: PVeRA (PEFT ``src/peft/tuners/pvera``)
    RANDLORA = "randlora"  #: RandLoRA (Albert et al., arXiv:2502.00987; PEFT ``src/peft/tuners/randlora``)
    ROAD = "road"  #: RoAd (Liao et al., arXiv:2409.00119; PEFT ``src/peft/tuners/road``)
    BOFT = "boft"  #: BOFT (Liu et al., arXiv:2311.06243; PEFT ``src/peft/tuners/boft``)
    MISS = "miss"  #: MiSS (Kang et al., arXiv:2409.15371; PEFT ``src/peft/tuners/miss``)
    SHIRA = "shira"  #: SHiRA (Bhardwaj et al., arXiv:2406.13175; PEFT ``src/peft/tuners/shira``)
    VERA = "vera"  #: VeRA (Kopiczko et al., arXiv:2310.11454; PEFT ``src/peft/tuners/vera``)
    #: every other method of an implementation (``Implementation.other_methods()``, e.g. PEFT's LoHa, LoKr and the
    #: rest of the installed release's tuners that target ``nn.Linear``), held to "refuse or work" only (TWIN-CREATE)
    OTHER = "other"


class Capability(NamedEnum):
    """What an implementation may declare besides its methods (``DOCS`` says what each promises)."""

    # bases and devices
    BITS4 = "4bit"
    BITS8 = "8bit"
    CUDA = "cuda"
    # operations
    UNMERGE = "unmerge"
    SAFE_MERGE = "safe_merge"
    MULTI_ADAPTER = "multi_adapter"
    ADDITIVE_ADAPTERS = "additive_adapters"
    MULTI_MERGE = "multi_merge"
    ACTIVE_TRAINABLE = "active_trainable"
    MIXED_BATCH = "mixed_batch"
    DISABLE_ADAPTERS = "disable_adapters"
    DELETE_ADAPTER = "delete_adapter"
    # options
    RSLORA = "rslora"
    LORA_BIAS = "lora_bias"
    DROPOUT = "dropout"
    INPUT_CAST = "input_cast"
    # whole models
    MODEL = "model"
    PREPARE = "prepare"
    DISTRIBUTED = "distributed"
    # dense twins (the TWIN-* clauses)
    DENSE_TWIN = "dense_twin"
    MERGE = "merge"
    # initializations that read or rewrite the base weight (the INIT-* clauses; ``conformance.core.inits.TABLE``)
    INIT_PISSA = "init_pissa"
    INIT_PISSA_NITER = "init_pissa_niter"
    INIT_OLORA = "init_olora"
    INIT_CORDA = "init_corda"
    INIT_LORA_GA = "init_lora_ga"
    INIT_LOFTQ = "init_loftq"


#: What declaring each capability promises (docs/implementing.md's capability table is made from this: ``conformance.docs``).
DOCS: dict[Capability, str] = {
    Capability.BITS4: "bnb.nn.Linear4bit bases (NF4/FP4, with and without double quant)",
    Capability.BITS8: "bnb.nn.Linear8bitLt bases",
    Capability.CUDA: "runs on CUDA devices",
    Capability.UNMERGE: "unmerge() undoes merge() (dequantize, remove the adapters, requantize)",
    Capability.SAFE_MERGE: "merge(safe_merge=True) checks the merged weights and refuses non-finite ones",
    Capability.MULTI_ADAPTER: "several named adapters on one layer: add_adapter(name, ...), set_adapter(name) makes "
                              "one of them the active one, merge(adapter_names=[name]) merges that one (whatever "
                              "several active or merged adapters mean is declared apart: additive_adapters, "
                              "multi_merge)",
    Capability.ADDITIVE_ADAPTERS: "set_adapter([names]) activates several adapters at once and the output is the "
                                  "base's plus the sum of their deltas (PEFT's composition; a library that stacks "
                                  "them in sequence does not declare it)",
    Capability.MULTI_MERGE: "several adapters merged into the base at once: merge() with several active, "
                            "merge(adapter_names=[a, b]); merged_adapters lists each (a library that holds one "
                            "merged adapter at a time does not declare it)",
    Capability.ACTIVE_TRAINABLE: "set_adapter makes exactly the active adapters trainable and freezes the others "
                                 "(PEFT's set_adapter: 'will set the specified adapters to trainable'); a library "
                                 "that trains an adapter by a call of its own (adapters' train_adapter) does not "
                                 "declare it",
    Capability.MIXED_BATCH: "forward(x, adapter_names=[...]) with one adapter name per sample ('__base__' = none)",
    Capability.DISABLE_ADAPTERS: "enable_adapters(False) / enable_adapters(True)",
    Capability.DELETE_ADAPTER: "delete_adapter(name)",
    Capability.RSLORA: "LoRA with use_rslora=True (scaling lora_alpha / sqrt(r))",
    Capability.LORA_BIAS: "LoRA with lora_bias=True (a bias on lora_B, scaled like B's output)",
    Capability.DROPOUT: "LoRA/DoRA lora_dropout > 0 and OFT module_dropout > 0: active in train mode (whatever the grad "
                        "mode), the identity in eval mode",
    Capability.INPUT_CAST: "the layer casts its input to the adapter dtype (AdapterSpec.dtype) before the adapter "
                           "path, so inputs of any float dtype work with float32 adapters",
    Capability.MODEL: "a model-level entry (implementation.model, a ModelEntry): attaches adapters to a transformers "
                      "model by target module names, merges and unloads, saves and loads the adapter, adds, "
                      "activates, disables and deletes adapters (the MODEL-* and TRAINER-* clauses)",
    Capability.PREPARE: "the model entry prepares a quantized model for training (ModelEntry.prepare: PEFT's "
                        "prepare_model_for_kbit_training; MODEL-PREPARE, MODEL-GRAD-CHECKPOINT, MODEL-FIRST-STEPS)",
    Capability.DISTRIBUTED: "layers built by create() train under torch DistributedDataParallel (adapter tensors "
                            "registered as parameters, deterministic under torch.manual_seed, implementation "
                            "object picklable for spawned ranks)",
    Capability.DENSE_TWIN: "create() also takes a plain torch.nn.Linear base (the same method's dense layer, the "
                           "TWIN-* clauses' yardstick), and adapter_parameters(name) gives every tensor of the "
                           "adapter (parameters and buffers) under names that are the same on both bases",
    **{c: f"LoRA with init_lora_weights={c.value[5:]!r} on a 4-bit or 8-bit base: it refuses at creation, or the base "
          "becomes what the initialization promises (INIT-* clauses; conformance.core.inits.TABLE)"
       for c in (Capability.INIT_PISSA, Capability.INIT_OLORA, Capability.INIT_CORDA, Capability.INIT_LORA_GA,
                 Capability.INIT_LOFTQ)},
    Capability.INIT_PISSA_NITER: "LoRA with init_lora_weights='pissa_niter_4' (PiSSA by torch.svd_lowrank) on a 4-bit "
                                 "or 8-bit base (INIT-* clauses; conformance.core.inits.TABLE)",
    Capability.MERGE: "merge() folds the adapter into the base weights (the TWIN-MERGE* clauses ask; the LoRA, OFT "
                      "and DoRA clauses take merge() as given)",
}

#: The methods with a hand-written float64 oracle (``conformance.numerics``): a clause that names no methods
#: applies to these. Every other method is judged against its dense twin only (the TWIN-* clauses).
ORACLE_METHODS: frozenset[Method] = frozenset({Method.LORA, Method.OFT, Method.DORA})
#: The methods judged against their dense twin only (``conformance.core.methods.TABLE`` has a row for each).
TWIN_METHODS: frozenset[Method] = frozenset(Method) - ORACLE_METHODS - {Method.OTHER}

#: The methods with LoRA's parameters and its ``lora_A``/``lora_B`` (DoRA adds a magnitude vector): where code treats
#: "LoRA-like" methods alike, it asks this one set.
LORA_LIKE: frozenset[Method] = frozenset({Method.LORA, Method.DORA})

#: What each method promises (``create(base, AdapterSpec(method=...))``).
METHOD_DOCS: dict[Method, str] = {
    Method.LORA: "LoRA adapters (create(base, AdapterSpec(method='lora', ...)))",
    Method.OFT: "OFT adapters (create(base, AdapterSpec(method='oft', ...)))",
    Method.DORA: "DoRA adapters: LoRA's parameters plus a magnitude vector (create(base, AdapterSpec(method='dora', "
                 "...)); adapter_parameters adds 'lora_magnitude_vector.weight')",
    Method.OTHER: "the implementation's other methods, each built by create(base, AdapterSpec(method=NAME)) for NAME "
                  "in other_methods(): refuse at creation or work (TWIN-CREATE)",
    **{m: f"{m.value} adapters, judged against their dense twin (TWIN-* clauses; minimal config and twin rule: "
          f"conformance.core.methods.TABLE)" for m in (
        Method.ADALORA, Method.HIRA, Method.IA3, Method.PVERA, Method.RANDLORA, Method.ROAD, Method.BOFT,
        Method.MISS, Method.SHIRA, Method.VERA)},
}

#: Where the layer keeps the promise of a capability that adds an optional operation or parameter.
LAYER_API: dict[Capability, str] = {
    Capability.UNMERGE: "AdapterLayer.unmerge",
    Capability.SAFE_MERGE: "AdapterLayer.merge(safe_merge=True)",
    Capability.MULTI_ADAPTER: "AdapterLayer.add_adapter / set_adapter(name) / merge(adapter_names=[name])",
    Capability.ADDITIVE_ADAPTERS: "AdapterLayer.set_adapter([name, ...])",
    Capability.MULTI_MERGE: "AdapterLayer.merge(adapter_names=[name, ...])",
    Capability.ACTIVE_TRAINABLE: "AdapterLayer.set_adapter (requires_grad of every adapter's tensors)",
    Capability.MIXED_BATCH: "AdapterLayer.forward(x, adapter_names=[...])",
    Capability.DISABLE_ADAPTERS: "AdapterLayer.enable_adapters",
    Capability.DELETE_ADAPTER: "AdapterLayer.delete_adapter",
    Capability.RSLORA: "AdapterSpec.params['use_rslora'] = True",
    Capability.LORA_BIAS: "AdapterSpec.params['lora_bias'] = True",
    Capability.DROPOUT: "AdapterSpec.params['lora_dropout'] > 0 (LoRA, DoRA) / AdapterSpec.params['module_dropout'] > 0 "
                        "(OFT)",
}

#: Adapter parameters whose use needs a capability (a true flag or a rate above zero).
PARAM_CAPABILITIES: dict[str, Capability] = {
    "use_rslora": Capability.RSLORA,
    "lora_bias": Capability.LORA_BIAS,
    "lora_dropout": Capability.DROPOUT,
    "module_dropout": Capability.DROPOUT,
}

#: The base bit widths and the capability that declares each.
BITS: dict[int, Capability] = {4: Capability.BITS4, 8: Capability.BITS8}


class UnknownName(ValueError):
    """A method or capability name outside the closed set; the message names the valid ones."""


def _lookup(kind: type[enum.Enum], name: Any, what: str) -> Any:
    try:
        return kind(name)
    except ValueError:
        valid = ", ".join(m.value for m in kind)
        raise UnknownName(f"unknown {what} {name!r}; valid: {valid}") from None


def capability(name: str | Capability) -> Capability:
    """``name`` as a ``Capability`` (``UnknownName`` for a misspelling)."""
    return _lookup(Capability, name, "capability")


def method(name: str | Method) -> Method:
    """``name`` as a ``Method`` (``UnknownName`` for a misspelling)."""
    return _lookup(Method, name, "method")


def capabilities(names: Iterable[str | Capability]) -> frozenset[Capability]:
    return frozenset(capability(n) for n in names)


def methods(names: Iterable[str | Method]) -> frozenset[Method]:
    return frozenset(method(n) for n in names)


def _active(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return bool(value)


def params_needing(params: Mapping[str, Any]) -> list[tuple[str, Capability]]:
    """(parameter, capability) for every adapter parameter in ``params`` whose value needs a capability."""
    return [(k, cap) for k, cap in PARAM_CAPABILITIES.items() if _active(params.get(k))]


@dataclass(frozen=True)
class Declaration:
    """What an implementation declares: its methods, capabilities and limitations.

    ``limitations[capability][method]`` is why ``capability`` does not hold for ``method`` (e.g. PEFT's
    OFT has no mixed batches): clauses that require it leave that method out and say so.
    """

    methods: frozenset[Method] = frozenset()
    capabilities: frozenset[Capability] = frozenset()
    limitations: Mapping[Capability, Mapping[Method, str]] = field(default_factory=dict)

    @property
    def bits(self) -> frozenset[int]:
        return frozenset(b for b, cap in BITS.items() if cap in self.capabilities)

    def has(self, cap: str | Capability, for_method: str | Method | None = None) -> bool:
        """Whether ``cap`` is declared (and, given a method, not limited for it)."""
        cap = capability(cap)
        if cap not in self.capabilities:
            return False
        return for_method is None or method(for_method) not in self.limitations.get(cap, {})

    def limitation(self, cap: str | Capability, for_method: str | Method) -> str | None:
        """Why ``cap`` does not hold for ``for_method`` (None when it does, or when it is not declared at all)."""
        return self.limitations.get(capability(cap), {}).get(method(for_method))

    @classmethod
    def of(cls, impl: Any) -> Declaration:
        """Read ``impl.methods``, ``impl.capabilities`` and ``impl.limitations`` (``UnknownName`` / ``TypeError``
        for what does not fit; the message says what does).

        A method named among ``capabilities`` (the spelling before ``methods`` existed: ``{"lora", "4bit"}``)
        counts as declaring that method; naming methods both ways is accepted only where both agree (a subclass
        of an implementation with ``methods`` that narrows ``capabilities`` must narrow ``methods``). ``limitations`` maps a capability to ``{method: reason}``; the
        flat ``{"CAPABILITY/METHOD": reason}`` form is read too.
        """
        caps = getattr(impl, "capabilities", ())
        if isinstance(caps, str) or not isinstance(caps, Iterable):
            raise TypeError(f"capabilities must be a set of names, got {type(caps).__name__}")
        meths = getattr(impl, "methods", ()) or ()
        if isinstance(meths, str) or not isinstance(meths, Iterable) or callable(meths):
            raise TypeError(f"methods must be a set of names, got {type(meths).__name__}")
        method_names = {m.value for m in Method}
        declared_methods = methods(meths)
        old_spelling = frozenset(Method(c) for c in caps if c in method_names)
        if declared_methods and old_spelling and old_spelling != declared_methods:
            raise UnknownName(f"methods {sorted(map(str, declared_methods))} and the methods named in capabilities "
                              f"{sorted(map(str, old_spelling))} differ; declare methods in `methods` only")
        declared_methods = declared_methods or old_spelling
        declared_caps = capabilities(c for c in caps if c not in method_names)
        lims = getattr(impl, "limitations", None) or {}
        if not isinstance(lims, Mapping):
            raise TypeError("limitations must be a mapping capability -> {method: reason}")
        limits: dict[Capability, dict[Method, str]] = {}
        for key, value in lims.items():
            if isinstance(value, Mapping):
                pairs = [(key, m, reason) for m, reason in value.items()]
            else:
                cap_name, sep, method_name = str(key).partition("/")
                if not sep:
                    raise UnknownName(f"limitations key {key!r} needs a mapping {{method: reason}} as its value "
                                      "(or the form 'CAPABILITY/METHOD': reason)")
                pairs = [(cap_name, method_name, value)]
            for cap_name, method_name, reason in pairs:
                try:
                    cap, meth = capability(cap_name), method(method_name)
                except UnknownName as exc:
                    raise UnknownName(f"limitations key {key!r}: {exc}") from None
                if not reason:
                    raise UnknownName(f"limitations key {key!r}: the limitation of {cap} for {meth} needs a reason")
                limits.setdefault(cap, {})[meth] = str(reason)
        return cls(declared_methods, declared_caps, limits)


def check_complete() -> None:
    """Every member documented (scikit-learn's ``_raise_for_missing_tags``); called by the test suite."""
    missing = [c.value for c in Capability if c not in DOCS] + [m.value for m in Method if m not in METHOD_DOCS]
    if missing:
        raise RuntimeError(f"undocumented vocabulary: {', '.join(missing)}")
