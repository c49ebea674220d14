"""Area ``compile``: adapter layers under ``torch.compile``, their forward and a merge/unmerge cycle between
compiled forwards, each forward confirmed to have run a compiled graph.

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
