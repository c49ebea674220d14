"""Which code an exception came from: the implementation under test (a failure) or the suite (an error).

**Attribution at the protocol boundary** (``verdict``): an exception that propagates out of a call
the check makes into the implementation's objects is the implementation's failure (``failed``, with
the exception type, message and the implementation's innermost frame); anything else raised by the
suite's own code is ``error``. The implementation's objects are the implementation object itself
and every layer ``make_layer`` returned (the wrappers in ``conformance/impls`` count as the
implementation). A call into one is found in the exception's traceback, not by wrapping the layer
(a proxy around an ``nn.Module`` changes what the checks see): a frame whose ``self`` is one of those
objects (``forward`` through ``nn.Module.__call__``, ``merge``, ``unmerge``, properties,
``nn.Module.__getattr__`` for a missing attribute), an ``AttributeError`` whose ``obj`` is one, or an
exception out of ``create`` (tagged by ``make_layer``, which re-raises it unchanged so checks that
expect a ``ValueError`` from ``create`` still see it).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator
from types import CodeType
from typing import Any

import torch

from conformance.clauses.clause import ClauseFailure, ClauseInconclusive
from conformance.clauses.interface import ImplementationUnsupported
from conformance.quant import layers as qlayers

try:  # a skipped case inside a hypothesis property is a rejected example, not an error
    from hypothesis.errors import UnsatisfiedAssumption as _CaseSkipBase
except ImportError:  # pragma: no cover - hypothesis is a dependency
    _CaseSkipBase = Exception  # type: ignore[assignment,misc]


class CaseSkipped(_CaseSkipBase):  # type: ignore[misc,valid-type]
    """One case needs a capability the implementation lacks: the case is left out (with a note), the rest
    of the clause runs. Inside a hypothesis property it rejects the example (hypothesis draws another)."""


#: attribute set on an exception that left the implementation's ``create`` (the exception itself is re-raised)
IMPL_CALL = "_conformance_impl_call"
#: where torch and bitsandbytes live: the implementation's frame reported is its innermost one outside them
#: (and outside the standard library)
_LIBRARY_DIRS = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, qlayers.bnb.__file__))
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


def _library_frame(filename: str) -> bool:
    if filename.startswith(_LIBRARY_DIRS) or filename.startswith("<"):
        return True
    return filename.startswith(_STDLIB) and "-packages" not in filename


def leaf(exc: BaseException) -> BaseException:
    """The exception that decides the outcome (a hypothesis ExceptionGroup of several bugs: a failure first)."""
    group = getattr(exc, "exceptions", None)  # BaseExceptionGroup (hypothesis reports several bugs so)
    if isinstance(group, tuple) and group:
        leaves = [leaf(e) for e in group]
        for kinds in ((ClauseFailure, AssertionError), (ClauseInconclusive,), (Exception,)):
            for e in leaves:
                if isinstance(e, kinds):
                    return e
    return exc


def _short(filename: str) -> str:
    parts = filename.replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])


def _skip_cause(exc: BaseException) -> BaseException | None:
    """The CaseSkipped / ImplementationUnsupported behind ``exc`` (itself, or what a check was handling when it
    failed: ``except Exception as e: ctx.fail(...)`` around a case that was refused), else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (CaseSkipped, ImplementationUnsupported)):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def implementation_origin(exc: BaseException, impl_objects: Iterable[object], make: CodeType) -> str | None:
    """Where ``exc`` left the implementation ("raised in litgpt/lora.py:123 in forward, called from
    forward.py:85"), or None when the suite's own code raised it (see the module docstring). ``impl_objects``: the
    implementation and the layers it built; ``make``: the code of ``CheckContext.make_layer``."""
    ids = {id(o) for o in impl_objects}
    frames = [(tb.tb_frame, tb.tb_lineno) for tb in _walk(exc.__traceback__)]
    start = caller = None
    if getattr(exc, IMPL_CALL, None) == "create":
        at = next((i for i, (f, _) in enumerate(frames) if f.f_code is make), None)
        if at is not None:  # the implementation's frames follow make_layer's; the check called make_layer
            start, caller = min(at + 1, len(frames) - 1), (at - 1 if at > 0 else None)
    if start is None:
        for i, (f, _) in enumerate(frames):
            if "self" in f.f_code.co_varnames and id(f.f_locals.get("self")) in ids:
                start = i
                break
    if start is None:
        if isinstance(exc, AttributeError) and id(getattr(exc, "obj", None)) in ids:
            return f"the implementation's layer has no attribute {getattr(exc, 'name', '?')!r}"
        return None
    inner = frames[start:]
    own = [fl for fl in inner if not _library_frame(fl[0].f_code.co_filename)] or inner
    frame, line = own[-1]
    where = f"raised in the implementation at {_short(frame.f_code.co_filename)}:{line} in {frame.f_code.co_name}"
    caller = start - 1 if caller is None else caller
    if caller >= 0:
        cframe, cline = frames[caller]
        where += f", called from {_short(cframe.f_code.co_filename)}:{cline}"
    return where


def _walk(tb: Any) -> Iterator[Any]:
    while tb is not None:
        yield tb
        tb = tb.tb_next
