"""What the trainer checks read from transformers and PEFT: where the Trainer's quantization validator lives, the
registered quantizers and their flags, PEFT configs, a probe loss and adapter-parameter bookkeeping."""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from conformance.clauses.interface import AdapterSpec

if TYPE_CHECKING:
    from conformance.clauses.context import CheckContext


#: The adapters the trainer clauses train: r=4 LoRA and DoRA (alpha 8), OFT with 8-wide blocks, dropout off; the
#: protocol's parameters (``AdapterSpec.params``), attached by the implementation's model entry.
TRAINER_PARAMS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "dora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "oft": {"r": 0, "oft_block_size": 8, "module_dropout": 0.0},
}

#: The canonical name of DoRA's magnitude vector among a layer's ``adapter_parameters``.
MAGNITUDE_KEY = "lora_magnitude_vector.weight"


#: Configs under which a registered QAT quantizer also declares itself trainable (transformers 5.23:
#: ``FPQuantHfQuantizer.is_trainable`` is ``store_master_weights``; ``BitNetHfQuantizer`` needs
#: ``linear_class="autobitlinear"`` and ``quantization_mode="online"``). Default configs are tried too.
QAT_CONFIG_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "fp_quant": [{"store_master_weights": True}],
    "bitnet": [{"linear_class": "autobitlinear", "quantization_mode": "online"}],
}


#: Text of the purely-quantized rejection; where it appears is where the installed transformers checks.
REJECTION_MARK = "purely quantized"


def _trainer_validator() -> Callable[..., Any] | None:
    """The function the installed transformers' ``Trainer.__init__`` calls to check quantized models, if any.

    transformers >= 5.0 has ``validate_quantization_for_training`` (``trainer_utils``, imported into
    ``trainer``); 4.x release check inline in ``Trainer.__init__`` (no separate function).
    """
    from transformers import trainer

    return getattr(trainer, "validate_quantization_for_training", None)


def validator_location() -> dict[str, str]:
    """Where the installed transformers checks quantized models, found at run time.

    ``validator`` names the function (5.x) or the ``Trainer.__init__`` lines holding the check inline
    (4.x); ``missing`` says why neither was found (then the trainer clauses are skipped).
    """
    import transformers
    from transformers import trainer

    out = {"transformers": transformers.__version__}
    init_lines, init_start = inspect.getsourcelines(trainer.Trainer.__init__)
    fn = _trainer_validator()
    if fn is not None:
        lines, start = inspect.getsourcelines(fn)
        out["validator"] = f"{fn.__module__.replace('.', '/')}.py:{start}-{start + len(lines) - 1} ({fn.__name__})"
        for i, line in enumerate(init_lines):
            if f"{fn.__name__}(" in line:
                out["called_from"] = f"transformers/trainer.py:{init_start + i} (Trainer.__init__)"
                break
        from transformers import trainer_utils

        if fn is not getattr(trainer_utils, fn.__name__, fn):
            out["note"] = f"transformers.trainer.{fn.__name__} is patched"
        return out
    hits = [init_start + i for i, line in enumerate(init_lines) if REJECTION_MARK in line or "support training" in line]
    if hits:
        first = next((init_start + i for i, line in enumerate(init_lines[: hits[0] - init_start])
                      if "is_quantized" in line), hits[0])
        out["validator"] = f"transformers/trainer.py:{first}-{hits[-1]} (inline in Trainer.__init__)"
        out["called_from"] = "transformers/trainer.py (Trainer.__init__, inline)"
        return out
    out["missing"] = (f"transformers {transformers.__version__} has no quantized-model check in Trainer "
                      f"(no validate_quantization_for_training, no {REJECTION_MARK!r} rejection in Trainer.__init__)")
    return out


def _record_source(ctx: CheckContext) -> None:
    """Record where the check lives; skip the clause when the installed transformers has none."""
    where = validator_location()
    for key, value in where.items():
        ctx.measure(key, value)
    if "missing" in where:
        ctx.skip(where["missing"])


def adapter_spec(method: str) -> AdapterSpec:
    """The trainer clauses' adapter ``method`` (``TRAINER_PARAMS``) as the protocol's spec."""
    if method not in TRAINER_PARAMS:
        raise ValueError(f"unknown method {method!r}; the trainer clauses train {sorted(TRAINER_PARAMS)}")
    return AdapterSpec(method, "default", dict(TRAINER_PARAMS[method]))


def adapter_params(entry: Any, model: nn.Module, key: str | None = None) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` (by their names in it) that its implementation says are adapter tensors: every
    ``adapter_parameters("default")`` of the entry's ``adapter_layers`` (only those under ``key`` when given), matched
    by identity, so ownership comes from the implementation, not from parameter names."""
    owned = {id(t) for layer in entry.adapter_layers(model).values()
             for k, t in layer.adapter_parameters("default").items() if key is None or k == key}
    return {n: p for n, p in model.named_parameters() if id(p) in owned}


def _short(msg: str) -> str:
    return msg if len(msg) <= 90 else msg[:87] + "..."


def _where(filename: str, line: int | None) -> str:
    """``package/module.py:line`` of an installed file (the path below site-packages), else its last two parts."""
    path = filename.replace(os.sep, "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1] + f":{line}"
    return "/".join(path.split("/")[-2:]) + f":{line}"


def raised(exc: BaseException) -> str:
    """``Type: message (at file:line in fn[, from the innermost PEFT frame])`` of an exception out of the environment.

    In these clauses the environment under test (transformers + PEFT + bitsandbytes) is called directly, so what
    it raises while a model is built, evaluated or trained is its failure, named with where it came from.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {_where(last.filename, last.lineno)} in {last.name}"
        peft_frames = [f for f in frames if f"{os.sep}peft{os.sep}" in f.filename]
        if peft_frames and peft_frames[-1] is not last:
            where += f", from {_where(peft_frames[-1].filename, peft_frames[-1].lineno)} in {peft_frames[-1].name}"
        where += ")"
    return f"{type(exc).__name__}: {_short(str(exc))}{where}"


def _label(arch: str, bits: int, method: str | None = None) -> str:
    q = "nf4" if bits == 4 else "int8"
    return f"{arch}-{q}" + (f"-{method}" if method else "")


def _probe_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Loss on ``batch`` without gradients, measured in *training* mode (all dropouts are 0 here).

    Not ``model.eval()``: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``
    weight in place on its first eval-mode no-grad forward (``_convert_weight_packed_for_cpu``),
    after which its forward no longer backpropagates; measuring must not change what is measured.
    TRAINER-EVAL-THEN-TRAIN checks that effect on its own.
    """
    was = model.training
    model.train()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was)
    return loss


def _param_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return _param_bytes_of(dict(model.named_parameters()))


def _param_bytes_of(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The bytes of each parameter (a bitwise snapshot)."""
    return {n: p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone() for n, p in params.items()}


def registry_quantizers(extra_configs: dict[str, list[dict[str, Any]]] | None = None) -> tuple[list[Any], list[str]]:
    """Instances of every quantizer in transformers' ``AUTO_QUANTIZER_MAPPING`` that can be built offline.

    Each is built from its registered config class (``AUTO_QUANTIZATION_CONFIG_MAPPING``) with
    default arguments and with each variant in ``extra_configs[key]``; building a quantizer does
    not load its kernels (``validate_environment`` is not called). Returns (quantizers, reasons
    for the ones that could not be built or whose flags raise).
    """
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    got, skipped = [], []
    for key, cls in AUTO_QUANTIZER_MAPPING.items():
        cfg_cls = AUTO_QUANTIZATION_CONFIG_MAPPING.get(key)
        if cfg_cls is None:
            skipped.append(f"{key}: no config class registered")
            continue
        for kwargs in [{}, *(extra_configs or {}).get(key, [])]:
            tag = key + "".join(f" {k}={v}" for k, v in kwargs.items())
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q = cls(cfg_cls(**kwargs))
                    _flags(q)
            except Exception as exc:  # optional backends missing, required arguments, ...
                skipped.append(f"{tag}: {type(exc).__name__}")
                continue
            q._conformance_tag = tag
            got.append(q)
    return got, skipped


def _flags(q: Any) -> tuple[bool, bool]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # FPQuant/MXFP4 log a warning when asked is_trainable
    try:
        return bool(q.is_trainable), bool(getattr(q, "is_qat_trainable", False))
    finally:
        hf_logging.set_verbosity(verbosity)


def _names_method(msg: str, q: Any) -> bool:
    """The message names the quant method, as its value ("fp_quant") or as the enum member.

    transformers formats ``f"{quant_method}"``; on Python >= 3.11 a ``(str, Enum)`` member then
    renders as ``QuantizationMethod.FPQUANT``, not its value, so both spellings count.
    """
    m = q.quantization_config.quant_method
    return str(getattr(m, "value", m)) in msg or str(m) in msg


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a wrapper (``PeftModel.get_base_model()``; where ``hf_quantizer`` lives), or
    the model itself (an entry that replaces modules in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
