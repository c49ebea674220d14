"""Area ``wording``: PEFT's exact user-facing texts.

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
