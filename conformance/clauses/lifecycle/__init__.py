"""Area ``lifecycle``: states after a merge.

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
