"""quant-adapter-conformance: reference layers, spec harness and suites for LoRA/OFT on bitsandbytes.

Layout (each layer imports only those above it):

- ``conformance.quant``: bitsandbytes layer helpers and bounds from the quantization state;
- ``conformance.numerics``: float64 expected values, bounds and observed/bound ratios;
- ``conformance.reference``: the reference LoRA/OFT layers (the yardstick);
- ``conformance.clauses``: the clauses, one package per area (declarations, checks, cases, broken twins), the
  implementation protocol and the check API (``context``); ``conformance.spec`` is its deprecated old name;
- ``conformance.impls``: the built-in implementations under test (reference, peft);
- ``conformance.harness``: what runs the spec (loader, runner, workers, results, reports, xfails);
- ``conformance.cli`` / ``conformance.testing``: the command line and the pytest/adopter API;
- tools beside them: ``probe`` (clone probe), ``bench``, ``ci`` (what nox sessions call).

Attributes below are imported lazily, so ``import conformance.reference`` loads no harness.
"""

import importlib
import logging

__version__ = "0.1.0"



class _BnbCpuLog(logging.Filter):
    """bitsandbytes' CPU backend warns on import when its optional CPU kernel cannot load (0.50.2: "Failed to
    load CPU gemm_4bit_forward from kernels-community: ...", a download that cannot work offline); the warning
    would bury our own output. Only its errors are shown; every message is kept for the fingerprint
    (``conformance.quant.dispatch``: whether the kernel loaded and why not)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return record.levelno >= logging.ERROR


BNB_CPU_LOG = _BnbCpuLog()
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.WARNING)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(BNB_CPU_LOG)

_LAZY = {
    "AdapterLayer": "conformance.clauses.interface",
    "AdapterSpec": "conformance.clauses.interface",
    "Implementation": "conformance.clauses.interface",
    "ImplementationBase": "conformance.clauses.interface",
}

__all__ = ["AdapterLayer", "AdapterSpec", "Implementation", "ImplementationBase", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy attributes
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")
