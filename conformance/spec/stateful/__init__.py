"""Stateful conformance: a hypothesis state machine over an adapter layer's lifecycle (issue #8).

Files by job: ``config`` (what an example starts from, violations, run counters), ``model`` (the
float64 model of the layer's logical state), ``driver`` (layer + model + the invariants), ``ops``
(the op table: applies / draw / apply / accepts / render; ``invalid`` holds the invalid steps),
``machine`` (the ``RuleBasedStateMachine``), ``run`` (budgeted runs, failures), ``shrink``
(replay, step deletion after a cut shrink, seed dependence), ``reproducer`` (runnable scripts).
The clauses are in ``conformance.spec.checks.stateful``; ``python -m conformance.spec.stateful``
runs the machine directly.
"""

from .config import MachineConfig, Stats, StepNotApplicable, Violation
from .driver import Driver
from .machine import make_machine
from .ops import OPS, run_step
from .run import RunResult
from .shrink import replay

# ``run`` is the module (``conformance.spec.stateful.run.run`` runs the machine), not re-exported as a function
__all__ = ["OPS", "Driver", "MachineConfig", "RunResult", "Stats", "StepNotApplicable", "Violation", "make_machine",
           "replay", "run_step"]
