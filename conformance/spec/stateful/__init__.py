"""Deprecated: the stateful machine moved to ``conformance.clauses.stateful`` (this name stays for old imports and
the stored reproducer scripts). The names this package exported are still exported."""

from conformance.clauses.stateful.config import MachineConfig, Stats, StepNotApplicable, Violation
from conformance.clauses.stateful.driver import Driver
from conformance.clauses.stateful.machine import make_machine
from conformance.clauses.stateful.ops import OPS, run_step
from conformance.clauses.stateful.run import RunResult
from conformance.clauses.stateful.shrink import replay
from conformance.spec import moved

moved(__name__)

__all__ = ["OPS", "Driver", "MachineConfig", "RunResult", "Stats", "StepNotApplicable", "Violation", "make_machine",
           "replay", "run_step"]
