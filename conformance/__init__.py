"""quant-adapter-conformance: reference layers, spec harness and suites for LoRA/OFT on bitsandbytes.

Layout (each layer imports only those above it):

- ``conformance.quant``: bitsandbytes layer helpers and bounds from the quantization state;
- ``conformance.numerics``: float64 expected values, bounds and observed/bound ratios;
- ``conformance.reference``: the reference LoRA/OFT layers (the yardstick);
- ``conformance.spec``: the clauses, their checks, cases and strategies, the implementation protocol;
- ``conformance.impls``: the built-in implementations under test (reference, peft);
- ``conformance.harness``: what runs the spec (loader, runner, workers, results, reports, xfails);
- ``conformance.cli`` / ``conformance.testing``: the command line and the pytest/adopter API;
- tools beside them: ``probe`` (clone probe), ``bench``, ``ci`` (what nox sessions call).

Attributes below are imported lazily, so ``import conformance.reference`` loads no harness.
"""

import importlib
import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` hub package is
# missing; it cannot download here anyway and the message would bury our own output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {
    "AdapterLayer": "conformance.spec.interface",
    "AdapterSpec": "conformance.spec.interface",
    "Implementation": "conformance.spec.interface",
    "ImplementationBase": "conformance.spec.interface",
}

__all__ = ["AdapterLayer", "AdapterSpec", "Implementation", "ImplementationBase", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy attributes
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")
