"""A merge-only, single-adapter LoRA over bitsandbytes layers (see impl.py)."""
