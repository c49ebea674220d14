"""Area ``oft_math``: OFT rotation math.

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
