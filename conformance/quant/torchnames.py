"""Names of torch objects, defined once: dtype names (``"bfloat16"``) and grad-mode names (``"no_grad"``).

Cases, reports, stored baselines, stateful steps and adapter specs carry dtypes and grad modes as
names (JSON-able, stable across torch versions); everything converts through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name reports, labels and specs use)."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``, or a dtype itself) -> ``torch.bfloat16``.

    Raises ``ValueError`` naming the problem for a name that is not a torch dtype.
    """
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}: give a torch dtype name such as 'float32', 'float16' or 'bfloat16'")
    return dt


#: grad-mode name -> the torch context manager (class) that enters it
GRAD_MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "grad": torch.enable_grad,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def grad_mode(name: str) -> contextlib.AbstractContextManager:
    """A fresh context manager for grad mode ``name`` (``with grad_mode("no_grad"): ...``)."""
    try:
        return GRAD_MODES[name]()
    except KeyError:
        raise ValueError(f"unknown grad mode {name!r}: one of {', '.join(GRAD_MODES)}") from None


def grad_mode_code(name: str) -> str:
    """The source text that enters grad mode ``name`` (``torch.enable_grad()`` for ``"grad"``), for reproducers."""
    grad_mode(name)  # validates
    return f"torch.{GRAD_MODES[name].__name__}()"
