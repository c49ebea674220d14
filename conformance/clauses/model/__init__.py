"""Area ``model``: adapters on whole transformers models, as users load, merge, save and reload them (declare, cases,
checks, broken)."""
