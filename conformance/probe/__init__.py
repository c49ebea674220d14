"""Probes for maintainers: questions about torch/bitsandbytes behaviour, answered per environment.

``python -m conformance probe clone``: is PEFT's defensive ``result.clone()`` (``peft/tuners/lora/bnb.py``) still
needed?
"""
