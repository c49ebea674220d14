"""Area ``init``: LoRA initializations that read or rewrite a quantized base (declare, cases, checks, broken)."""
