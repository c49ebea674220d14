"""A toy third-party implementation for the conformance suite: LoRA over ``bnb.nn.Linear4bit``."""
