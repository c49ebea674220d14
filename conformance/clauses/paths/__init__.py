"""Area ``paths``: forwards, reads and merges in the order users run them (eval, inference, train, merge).

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
