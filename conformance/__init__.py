"""quant-adapter-conformance: reference layers, spec harness and suites for LoRA/OFT on bitsandbytes."""

__version__ = "0.1.0"

from conformance.spec.implementation import AdapterSpec, Implementation, ImplementationBase  # noqa: E402

__all__ = ["AdapterSpec", "Implementation", "ImplementationBase", "__version__"]
