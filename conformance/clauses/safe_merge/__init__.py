"""Area ``safe_merge``: NaN-guarded safe merge.

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
