"""The spec harness: clauses, implementations, runner and reports."""

from .clauses import Clause, clause, registry, select
from .context import CheckContext, ClauseFailure, ClauseSkipped
from .implementation import AdapterSpec, Implementation, ImplementationBase, load

__all__ = [
    "AdapterSpec", "CheckContext", "Clause", "ClauseFailure", "ClauseSkipped", "Implementation",
    "ImplementationBase", "clause", "load", "registry", "select",
]
