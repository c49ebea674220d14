"""Observing what an implementation tells its user: the warnings a step issues."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator

import bitsandbytes as bnb
import torch


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def warning_texts(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught]


def user_warnings(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    """Texts of the ``UserWarning``s (and subclasses) among ``caught``."""
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


_LIBRARIES = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, bnb))


def implementation_warnings(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    """Texts of the warnings not issued inside torch or bitsandbytes.

    A warning raised inside the libraries below the implementation (a torch deprecation, a
    bitsandbytes ``UserWarning``) is not the implementation telling the user about a bad step, and
    must not count as the "warns clearly" of an invalid-step clause (STATE-INVALID-STEP-SAFE):
    otherwise an implementation that silently accepts the step passes whenever the library happens
    to warn during it.
    """
    return [str(w.message) for w in caught if not os.path.abspath(w.filename).startswith(_LIBRARIES)]
