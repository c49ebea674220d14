"""The model area's cases: the load paths, the targets, the adapter specs and the inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conformance import tinymodels
from conformance.clauses.twin import cases as tcases

ARCH = "llama"
TARGETS = tinymodels.ATTENTION_TARGETS[ARCH]
#: quantized at load time from a float checkpoint; read back from a quantized checkpoint
LOAD_PATHS = ("quantize-at-load", "quantized-checkpoint")
NEW_TOKENS = 6


def load(path: str, bits: int, seed: int, device: str) -> nn.Module:
    """A fresh tiny model on ``path`` (``LOAD_PATHS``), in eval mode."""
    if path == "quantize-at-load":
        model = tinymodels.load_quantized(ARCH, bits, seed=seed, device=device)
    else:
        model = tinymodels.load_from_quantized_checkpoint(ARCH, bits, seed=seed, device=device)
    return model.eval()


def params(method: str) -> dict[str, Any]:
    """The method table's minimal config (``conformance.core.methods``)."""
    return tcases.params(method)


def targeted(model: nn.Module) -> list[str]:
    """The bitsandbytes layers of ``model`` the targets name."""
    return sorted(n for n in tinymodels.bnb_layers(model) if any(n.endswith("." + t) for t in TARGETS))


def input_ids(device: str, seed: int) -> torch.Tensor:
    return tinymodels.fixed_batch(batch_size=2, seq_len=8, seed=seed)["input_ids"].to(device)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode logits (its mode restored after): a library whose attach puts the model in train mode
    (AdapterHub ``adapters``' ``train_adapter`` calls ``model.train()``) is compared with the base in the same mode;
    bitsandbytes' 8-bit forward with an outlier threshold differs between the modes by itself."""
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits.detach()
    finally:
        model.train(was)


@torch.no_grad()
def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``NEW_TOKENS`` greedy tokens after ``ids`` (no end-of-sequence stop)."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


#: the 4-bit payload dtypes of the dtype-move clause (``bnb_4bit_quant_storage``); 8-bit bases have one
QUANT_STORAGES = (torch.uint8, torch.bfloat16, torch.float32)

#: the dtype moves users call on a model: name -> (the call, the dtype it casts floating tensors to)
DTYPE_MOVES: dict[str, tuple[Any, torch.dtype]] = {
    "to(torch.float16)": (lambda m: m.to(torch.float16), torch.float16),
    "half()": (lambda m: m.half(), torch.float16),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "float()": (lambda m: m.float(), torch.float32),
}


def load_stored(bits: int, storage: torch.dtype, seed: int, device: str) -> nn.Module:
    """A fresh tiny model quantized at load time, its 4-bit payload stored as ``storage``, in eval mode."""
    kw = {"quant_storage": storage} if bits == 4 else {}
    return tinymodels.load_quantized(ARCH, bits, seed=seed, device=device, **kw).eval()
