"""Area ``stateful``: a hypothesis state machine over an adapter layer's lifecycle.

``declare`` declares the clauses (torch-free), ``checks`` binds their checks. The engine, by job: ``config``
(what an example starts from, violations, run counters), ``model`` (the float64 model of the layer's logical
state), ``driver`` (layer + model + the invariants), ``ops`` (the op table: applies / draw / apply / accepts /
render; ``invalid`` holds the invalid steps), ``machine`` (the ``RuleBasedStateMachine``), ``run`` (budgeted
runs, failures), ``shrink`` (replay, step deletion after a cut shrink, seed dependence), ``reproducer``
(runnable scripts).

Importing this package imports nothing else (the clause listing imports ``declare`` without torch); import the
engine's modules by name.
"""
