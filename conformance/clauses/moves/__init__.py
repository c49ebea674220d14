"""Area ``moves``: what users do to a whole adapter layer with ``nn.Module`` methods (dtype casts, device moves).

``declare`` declares its clauses (torch-free), ``checks`` binds their checks. Importing this package imports nothing else.
"""
