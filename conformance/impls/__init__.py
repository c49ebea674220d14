"""Built-in implementations under test: ``reference`` (ours) and ``peft`` (the installed PEFT)."""
