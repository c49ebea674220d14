"""Stateful conformance: hypothesis state machines over an adapter layer's lifecycle (issue #8).

``machine`` drives a layer through random valid (and invalid) step sequences beside a float64
``model`` of its logical state; ``reproducer`` writes a shrunk failing sequence as a runnable
script. The clauses are in ``conformance.spec.checks.stateful``; ``python -m conformance.spec.stateful``
runs the machine directly.
"""

from .machine import CLAUSE_IDS, Driver, MachineConfig, RunResult, make_machine, replay, run

__all__ = ["CLAUSE_IDS", "Driver", "MachineConfig", "RunResult", "make_machine", "replay", "run"]
