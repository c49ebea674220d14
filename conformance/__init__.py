"""quant-adapter-conformance: reference layers, spec harness and suites for LoRA/OFT on bitsandbytes."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` hub package is
# missing; it cannot download here anyway and the message would bury our own output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from conformance.spec.implementation import AdapterSpec, Implementation, ImplementationBase  # noqa: E402

__all__ = ["AdapterSpec", "Implementation", "ImplementationBase", "__version__"]
