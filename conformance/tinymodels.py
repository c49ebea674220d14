"""Tiny random causal-LM models, quantized by bitsandbytes through transformers, built in process.

The Trainer clauses (``conformance.clauses.trainer.checks``: transformers' ``Trainer`` rules) need whole
``PreTrainedModel`` objects loaded the way users load them: ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))``. Nothing is downloaded: a random model is built
from a small config (hidden size 64, 2 layers, vocabulary 96), saved once per process to a
temporary directory, and loaded from there with ``local_files_only=True``. Loaded models are
cached per (arch, bits, settings) and every caller gets a deep copy, so a check may wrap, compile
or train what it gets without disturbing the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

ARCHS: tuple[str, ...] = ("llama", "opt")
VOCAB_SIZE = 96
HIDDEN_SIZE = 64
NUM_LAYERS = 2
#: Linear layers that PEFT adapters target in the tiny models (both archs name them alike).
ATTENTION_TARGETS: dict[str, list[str]] = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}


def tiny_config(arch: str) -> Any:
    """A ``LlamaConfig`` / ``OPTConfig`` small enough to train a few steps on a CPU in about a second."""
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=2 * HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=64, tie_word_embeddings=False,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, ffn_dim=2 * HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN_SIZE,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )
    raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(ARCHS)}")


def _model_class(arch: str) -> Any:
    import transformers

    return {"llama": transformers.LlamaForCausalLM, "opt": transformers.OPTForCausalLM}[arch]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars, no info logs, no warnings while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@functools.cache
def tmp_dir() -> Path:
    """A per-process scratch directory (removed at exit) for saved tiny models and Trainer output."""
    root = Path(tempfile.mkdtemp(prefix="conformance-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def saved_model_dir(arch: str, seed: int = 0) -> Path:
    """Directory holding a random float32 ``arch`` model saved with ``save_pretrained`` (once per process)."""
    path = tmp_dir() / f"{arch}-seed{seed}"
    with quiet_transformers():
        torch.random.default_generator.manual_seed(seed)  # CPU generator only: see cpu_rng()
        model = _model_class(arch)(tiny_config(arch))
        model.save_pretrained(path)
    return path


def bnb_config(bits: int, *, quant_type: str = "nf4", double_quant: bool = False,
               compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8) -> Any:
    """The ``BitsAndBytesConfig`` users pass for 4-bit (NF4/FP4) or 8-bit loading (``quant_storage``: the 4-bit
    payload's dtype, a float one as FSDP-QLoRA loads it)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def _device_map(device: str) -> Any:
    """``device_map`` for ``from_pretrained``: ``"cpu"``, or the whole model on one CUDA device."""
    return "cpu" if torch.device(device).type == "cpu" else {"": torch.device(device).index or 0}


@functools.cache
def _loaded(arch: str, bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
            seed: int, device: str = "cpu", quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    with quiet_transformers():
        return _model_class(arch).from_pretrained(
            saved_model_dir(arch, seed), quantization_config=bnb_config(
                bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                quant_storage=quant_storage),
            device_map=_device_map(device), local_files_only=True, **dtype_kwarg(torch.float32),
        )


@functools.cache
def quantized_checkpoint_dir(arch: str, bits: int, seed: int = 0, device: str = "cpu") -> Path:
    """Directory holding the tiny ``arch`` model quantized at load (``bits``, NF4 for 4-bit) and saved with
    ``save_pretrained``: a quantized checkpoint, as users publish one (once per process)."""
    path = tmp_dir() / f"{arch}-seed{seed}-{bits}bit-{torch.device(device).type}"
    with quiet_transformers():
        _loaded(arch, bits, "nf4", False, torch.float32, seed, device).save_pretrained(path)
    return path


def load_saved(arch: str, path: str | Path, *, device: str = "cpu") -> nn.Module:
    """The tiny ``arch`` model saved (quantized) at ``path``, read back: the ``quantization_config`` comes from the
    checkpoint's config, none is passed; the dtype of the rest is float32, as at the first load (transformers 4.x
    would otherwise take float16 for a bitsandbytes model)."""
    with quiet_transformers():
        return _model_class(arch).from_pretrained(path, device_map=_device_map(device), local_files_only=True,
                                                  **dtype_kwarg(torch.float32))


@functools.cache
def _read_back(arch: str, bits: int, seed: int, device: str) -> nn.Module:
    return load_saved(arch, quantized_checkpoint_dir(arch, bits, seed, device), device=device)


def load_from_quantized_checkpoint(arch: str, bits: int, *, seed: int = 0, device: str = "cpu") -> nn.Module:
    """A fresh tiny ``arch`` model read back from its quantized checkpoint (``quantized_checkpoint_dir``): read once
    per process, then deep-copied as ``load_quantized`` does, so callers may mutate what they get."""
    return copy.deepcopy(_read_back(arch, bits, seed, device))


def model_class(arch: str) -> Any:
    """The transformers class of the tiny ``arch`` model (what reloads a saved one)."""
    return _model_class(arch)


#: First transformers release whose ``from_pretrained`` takes ``dtype=`` (earlier ones: ``torch_dtype=``,
#: and pass an unknown ``dtype`` on to the model config, which rejects it).
DTYPE_KWARG_SINCE = (4, 56)


def dtype_kwarg(dtype: torch.dtype, version: str | None = None) -> dict[str, torch.dtype]:
    """``{"dtype": dtype}`` or, before transformers 4.56, ``{"torch_dtype": dtype}`` (the installed release's name)."""
    if version is None:
        import transformers

        version = transformers.__version__
    release = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return {"dtype" if release >= DTYPE_KWARG_SINCE else "torch_dtype": dtype}


def load_quantized(arch: str, bits: int, *, quant_type: str = "nf4", double_quant: bool = False,
                   compute_dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
                   quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """A fresh (deep-copied) tiny ``arch`` causal LM loaded with a bitsandbytes ``bits``-bit config on ``device``.

    The first call per setting runs ``from_pretrained(quantization_config=..., device_map=...)``;
    later calls copy that model, so callers may mutate what they get.
    """
    model = _loaded(arch, bits, quant_type, double_quant, compute_dtype, seed, device, quant_storage)
    return copy.deepcopy(model)


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` in ``model``, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def fixed_batch(batch_size: int = 4, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic language-modelling batch (labels = input ids) over the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def as_dataset(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The rows of ``batch`` as an in-memory map-style dataset (what ``Trainer`` takes)."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


@contextlib.contextmanager
def cpu_rng() -> Iterator[None]:
    """Seeding inside the block touches the CPU generator only, never CUDA.

    ``torch.manual_seed`` (torch/random.py) and ``transformers.set_seed`` (called by
    ``Trainer.__init__``) also run ``torch.cuda.manual_seed_all``, which executes at once when
    the process already initialised CUDA. The trainer clauses run on the CPU only; on a GPU host
    a CUDA context another test broke (an illegal memory access is sticky) would make them err
    in seeding. Inside this block the CUDA seeding calls are no-ops.
    """
    import torch.cuda

    saved = torch.cuda.manual_seed_all, torch.cuda.manual_seed
    torch.cuda.manual_seed_all = _no_cuda_seed
    torch.cuda.manual_seed = _no_cuda_seed
    try:
        yield
    finally:
        torch.cuda.manual_seed_all, torch.cuda.manual_seed = saved


def _no_cuda_seed(seed: int) -> None:  # noqa: ARG001  (stands in for torch.cuda.manual_seed[_all])
    return None
