"""bitsandbytes' and transformers' own known failures: the shipped lists every implementation is checked against.

Some cases fail inside bitsandbytes whatever adapter sits on the layer (its CPU packed layout asserts on some
shapes, a train-mode forward after a repack raises). Such a case still runs and is reported ``xfailed`` when it
fails *as listed* (its error text contains the entry's ``error``), ``xpassed`` when it passes (an upstream fix:
remove the entry), and ``failed`` when it fails some other way. The list is ``xfails/bitsandbytes.ini``
(documented in ``xfails/README.md``); each entry is keyed by a bitsandbytes version range and the CPU feature
the failing path needs, and names a standalone reproducer that uses bitsandbytes and torch alone. Failures inside
transformers' loading and saving (whatever adapter library sits on the model) are listed the same way in
``xfails/transformers.ini``, keyed by a transformers version range, with reproducers using transformers, bitsandbytes
and torch alone.

A check names the situation of a case by ``key`` (``ctx.known_upstream(key)``); this module decides whether the
running bitsandbytes on this CPU has that situation listed. Torch-free: the CLI lists the entries without it.
"""

from __future__ import annotations

import configparser
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: the shipped list (in the checkout: the project runs from it, see noxfile.py)
LIST_PATH = Path(__file__).resolve().parents[2] / "xfails" / "bitsandbytes.ini"
#: the shipped list of transformers' own failures (the same format, a ``transformers`` version range)
TRANSFORMERS_LIST_PATH = LIST_PATH.with_name("transformers.ini")
#: the libraries an entry may be keyed by: each entry names exactly one, with its version range
LIBRARIES = ("bitsandbytes", "transformers")

#: the situations the checks name (one constant each; every one has an entry in the shipped list for the
#: bitsandbytes versions it is known for: suites/test_paths.py)
CPU_PACKED_SHAPE = "cpu-packed-shape"  #: an eval forward repacks a shape the repack refuses
CPU_PACKED_TRAIN_GRAD = "cpu-packed-train-grad"  #: a forward with grad whose base input requires grad, once repacked
CPU_PACKED_NO_GRAD = "cpu-packed-no-grad"  #: a bias-free train-mode forward, once repacked: no gradient to its input
FLOAT_STORAGE_CAST = "float-storage-cast"  #: a module dtype cast of a 4-bit payload stored as a float
INT8_STATE_CUDA = "int8-state-cuda"  #: a CUDA move of an 8-bit layer whose int8 state a CPU forward filled
INT8_FP16_WEIGHTS_TO_DEVICE = "int8-fp16-weights-to-device"  #: a float16 Int8Params built on the CPU, moved to CUDA
COMPILE_BIAS_CAST = "compile-bias-cast"  #: inductor over a forward that casts the layer's bias to the input dtype
#: transformers' save_pretrained of a model read back from a bitsandbytes-quantized checkpoint
QUANTIZED_CHECKPOINT_RESAVE = "quantized-checkpoint-resave"
#: transformers' save_pretrained of a 4-bit model that bitsandbytes repacked into its CPU layout
CPU_PACKED_SAVE = "cpu-packed-save"
#: transformers' Trainer rules skipped for a model marked as carrying adapters (``_hf_peft_config_loaded``)
ADAPTER_MARK_SKIPS_RULES = "adapter-mark-skips-rules"
#: a state dict of a 4-bit layer FSDP2 has sharded (its weight a DTensor without quant state)
FSDP2_STATE_DICT_QUANT_STATE = "fsdp2-state-dict-quant-state"
#: an 8-bit layer under FSDP2: the weight it gathers has none of Int8Params' CB/SCB attributes
FSDP2_INT8_WEIGHT_ATTRS = "fsdp2-int8-weight-attrs"
SITUATIONS = (CPU_PACKED_SHAPE, CPU_PACKED_TRAIN_GRAD, CPU_PACKED_NO_GRAD, FLOAT_STORAGE_CAST, INT8_STATE_CUDA,
              INT8_FP16_WEIGHTS_TO_DEVICE, COMPILE_BIAS_CAST, QUANTIZED_CHECKPOINT_RESAVE, CPU_PACKED_SAVE,
              ADAPTER_MARK_SKIPS_RULES, FSDP2_STATE_DICT_QUANT_STATE, FSDP2_INT8_WEIGHT_ATTRS)

#: CPU features an entry may need, each answered by bitsandbytes itself (``conformance.quant.layers``)
CPU_FEATURES = ("avx512_bf16",)

_FIELDS = {"key", *LIBRARIES, "cpu_feature", "error", "reason", "reproducer", "upstream", "avoidable"}


class UpstreamListError(ValueError):
    """The shipped list is malformed; the message names the entry and the fix."""


@dataclass(frozen=True)
class KnownFailure:
    """One listed bitsandbytes (or transformers) failure."""

    key: str  #: the situation a check names (``cpu-packed-shape``)
    bitsandbytes: str = ""  #: version range (``>=0.50,<0.51``; ``in_range``) of a bitsandbytes failure
    error: str = ""  #: text the failure's message contains (another failure is not this one)
    reason: str = ""  #: what the library does
    reproducer: str = ""  #: standalone script (the library + torch), relative to the checkout
    cpu_feature: str | None = None  #: the CPU feature the failing path needs (None: any CPU)
    upstream: str = ""  #: where upstream it lives (file, function)
    #: an implementation can work around it (``avoidable = yes``): a case that passes is a pass, with a note,
    #: never an xpass (the reference does, so the entry must stay listed for those that don't)
    avoidable: bool = False
    transformers: str = ""  #: version range of a transformers failure (an entry names one library's range)

    @property
    def library(self) -> str:
        return "transformers" if self.transformers else "bitsandbytes"

    @property
    def versions(self) -> str:
        return self.transformers or self.bitsandbytes

    def applies(self, versions: Mapping[str, str] | str, has_feature: Callable[[str], bool]) -> bool:
        """Whether this entry covers a run with ``versions`` (library -> installed version; a string: the
        bitsandbytes version) on a CPU answering ``has_feature``."""
        installed = {"bitsandbytes": versions} if isinstance(versions, str) else versions
        version = installed.get(self.library)
        return (version is not None and in_range(version, self.versions)
                and (self.cpu_feature is None or has_feature(self.cpu_feature)))

    def matches(self, message: str) -> bool:
        """Whether a failure with ``message`` is this known one."""
        return self.error.lower() in message.lower()

    def describe(self) -> str:
        return (f"{self.library} known failure {self.key} ({self.library} {self.versions}"
                + (f", {self.cpu_feature}" if self.cpu_feature else "") + f"): {self.reason}; reproducer "
                + self.reproducer)


_OPS: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version (``0.50.2.dev0+cpu`` -> ``(0, 50, 2)``), zero-padded to three."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break
    return tuple(parts + [0] * (3 - len(parts)))


def in_range(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies every comma-separated clause of ``spec`` (``>=0.50,<0.51``; the operators
    of PEP 440 without its pre-release rules: only release numbers are compared). ValueError for a bad clause."""
    v = release(version)
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        op = next((o for o in sorted(_OPS, key=len, reverse=True) if clause.startswith(o)), None)
        if op is None or not clause[len(op):].strip():
            raise ValueError(f"bad version clause {clause!r} in {spec!r}: use >=, <=, >, <, == or != and a version")
        if not _OPS[op](v, release(clause[len(op):].strip())):
            return False
    return True


def parse(text: str, source: str = "<bitsandbytes.ini>") -> list[KnownFailure]:
    """The entries of a list (one INI section each, named by its key); ``UpstreamListError`` naming the entry
    and the fix otherwise."""
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    try:
        parser.read_string(text, source)
    except configparser.Error as exc:
        raise UpstreamListError(f"{source}: not a valid list ({type(exc).__name__}: {exc}); fix the file") from None
    out = []
    for name in parser.sections():
        entry = {"key": name, **dict(parser[name])}
        where = f"{source}: [{name}]"
        unknown = sorted(set(entry) - _FIELDS)
        missing = sorted({"error", "reason", "reproducer"} - set(entry))
        ranges = [lib for lib in LIBRARIES if lib in entry]
        if len(ranges) != 1:
            missing.append(f"exactly one version range of {list(LIBRARIES)} (got {ranges})")
        if unknown or missing:
            raise UpstreamListError(f"{where}: " + "; ".join(
                ([f"unknown field(s) {unknown}"] if unknown else []) + ([f"missing field(s) {missing}"] if missing else []))
                + f"; the fields are {sorted(_FIELDS - {'key'})}")
        try:
            in_range("0", entry[ranges[0]])
        except ValueError as exc:
            raise UpstreamListError(f"{where}: {exc}") from None
        feature = entry.get("cpu_feature")
        if feature is not None and feature not in CPU_FEATURES:
            raise UpstreamListError(f"{where}: unknown cpu_feature {feature!r}; one of {list(CPU_FEATURES)}")
        avoidable = entry.pop("avoidable", "no").strip().lower()
        if avoidable not in ("yes", "no"):
            raise UpstreamListError(f"{where}: avoidable must be yes or no, not {avoidable!r}")
        out.append(KnownFailure(**entry, avoidable=avoidable == "yes"))
    return out


def load(*paths: str | Path) -> list[KnownFailure]:
    """The shipped lists (default: bitsandbytes' and transformers'; a missing file lists nothing: then nothing is
    known and such cases fail)."""
    out: list[KnownFailure] = []
    for p in map(Path, paths or (LIST_PATH, TRANSFORMERS_LIST_PATH)):
        if p.exists():
            out += parse(p.read_text(encoding="utf-8"), str(p))
    return out


def find(entries: Iterable[KnownFailure], key: str, versions: Mapping[str, str] | str,
         has_feature: Callable[[str], bool]) -> KnownFailure | None:
    """The entry listing ``key`` for these library versions (a string: the bitsandbytes version) and CPU, if any."""
    for e in entries:
        if e.key == key and e.applies(versions, has_feature):
            return e
    return None
