"""PEFT's LoRA initializations that read the base weight, driven the way PEFT's docs drive them on a quantized model.

Each goes through ``get_peft_model`` on a one-layer model marked as transformers marks a bitsandbytes model
(``peft_tuners.OneLayer``), after the preparation the initialization documents (peft v0.21.2):

- ``pissa``, ``pissa_niter_N``, ``olora``: ``LoraConfig(init_lora_weights=...)`` alone (``LoraLayer.pissa_init``,
  ``olora_init``).
- ``corda``: ``preprocess_corda(model, config, run_model=...)`` with calibration inputs drawn here (seeded), then
  ``get_peft_model`` (``src/peft/tuners/lora/corda.py``; examples/corda_finetuning).
- ``lora_ga``: ``preprocess_loraga(model, config, train_step=...)`` with a squared-output loss on inputs drawn here,
  then ``get_peft_model`` (``src/peft/tuners/lora/loraga.py``).
- ``loftq``: ``get_peft_model`` with the default init, then ``replace_lora_weights_loftq(model, model_path=...)`` reading
  the float weight from a ``model.safetensors`` this module writes to a temporary directory
  (``src/peft/utils/loftq_utils.py``: the documented path for a model bitsandbytes already quantized). PEFT computes
  it on ``cuda`` or ``xpu`` (``_loftq_init_new``: ``compute_device``), so elsewhere it is unavailable
  (``unavailable``), not failed.

What the installed release has is found by feature detection (``InitApi.unsupported``).
"""

from __future__ import annotations

import importlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conformance.core.inits import LOFTQ_WEIGHT, TABLE, Init, of_value
from conformance.impls.peft_tuners import TARGET, OneLayer

#: where each initialization lives in PEFT (module, attribute): absent means the release does not have it
WHERE: dict[Init, tuple[str, str]] = {
    Init.PISSA: ("peft.tuners.lora.layer", "LoraLayer.pissa_init"),
    Init.PISSA_NITER: ("peft.tuners.lora.layer", "LoraLayer.pissa_init"),
    Init.OLORA: ("peft.tuners.lora.layer", "LoraLayer.olora_init"),
    Init.CORDA: ("peft.tuners.lora.corda", "preprocess_corda"),
    Init.LORA_GA: ("peft.tuners.lora.loraga", "preprocess_loraga"),
    Init.LOFTQ: ("peft.utils.loftq_utils", "replace_lora_weights_loftq"),
}
#: calibration rows CorDA and LoRA-GA see (CorDA's covariance is in_features x in_features: more rows than columns)
CALIBRATION_ROWS = 256


def _find(path: tuple[str, str]) -> Any | None:
    module, attr = path
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class InitApi:
    """The installed PEFT's initializations that read the base (``unsupported``: capability -> why not)."""

    def __init__(self, peft: Any, version: str) -> None:
        self.peft = peft
        self.version = version
        self.unsupported: dict[str, str] = {}
        for init, path in WHERE.items():
            if _find(path) is None:
                self.unsupported[str(TABLE[init].capability)] = f"peft {version} has no {path[0]}.{path[1]}"

    def unavailable(self, value: str, device: str) -> str | None:
        """Why ``init_lora_weights=value`` cannot run on ``device`` with this PEFT (None when it can)."""
        if of_value(value) is Init.LOFTQ and torch.device(device).type not in ("cuda", "xpu"):
            return (f"peft {self.version} computes LoftQ on cuda or xpu only (src/peft/utils/loftq_utils.py "
                    f"_loftq_init_new: compute_device), not on {torch.device(device).type}")
        return None

    def build(self, base: nn.Module, config: Any, init: Init, adapter_name: str, loftq_weight: torch.Tensor | None,
              seed: int = 0) -> nn.Module:
        """PEFT's LoRA layer over ``base`` for ``config`` and ``init`` (LoftQ's config has the default init: the
        documented path replaces it after ``get_peft_model``; ``LoraConfig(init_lora_weights='loftq')`` is LoftQ on
        a float model, which asks for a ``loftq_config`` and quantizes by itself)."""
        config.target_modules = [TARGET]
        holder = OneLayer(base)
        gen = torch.Generator().manual_seed(seed)
        # in the bias's dtype where there is one: bitsandbytes' forward casts the bias to the input's dtype
        # (Linear4bit/Linear8bitLt.forward), and the calibration must not change the base it calibrates
        dtype = base.bias.dtype if getattr(base, "bias", None) is not None else torch.float32
        rows = torch.randn(CALIBRATION_ROWS, base.in_features, generator=gen).to(base.weight.device, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if init is Init.CORDA:
                config.corda_config = importlib.import_module("peft.tuners.lora.config").CordaConfig()
                _find(WHERE[Init.CORDA])(holder, config, run_model=lambda: holder(rows))
            elif init is Init.LORA_GA:
                config.lora_ga_config = importlib.import_module("peft.tuners.lora.config").LoraGAConfig()
                _find(WHERE[Init.LORA_GA])(holder, config,
                                           train_step=lambda: holder(rows).float().square().mean().backward())
            model = self.peft.get_peft_model(holder, config, adapter_name=adapter_name)
            if init is Init.LOFTQ:
                self._loftq(model, adapter_name, base, loftq_weight)
        return getattr(holder, TARGET)

    @staticmethod
    def _loftq(model: nn.Module, adapter_name: str, base: nn.Module, weight: torch.Tensor | None) -> None:
        if weight is None:
            raise ValueError(f"init_lora_weights='loftq' on a quantized base needs {LOFTQ_WEIGHT}=<the float weight>")
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="conformance-loftq-") as tmp:
            save_file({f"{TARGET}.weight": weight.detach().float().cpu().contiguous()},
                      str(Path(tmp) / "model.safetensors"))
            _find(WHERE[Init.LOFTQ])(model, model_path=tmp, adapter_name=adapter_name)
