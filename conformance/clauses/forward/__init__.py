"""Area ``forward``: the unmerged forward.

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
