"""The spec: clauses (``catalog`` as data, ``checks`` as code), the implementation protocol
(``interface``), case vocabularies (``cases``), hypothesis strategies (``strategies``) and the
stateful engine (``stateful``).

Nothing here imports the harness that runs it (``conformance.harness``); importing this package
imports no torch.
"""

from .clauses import Clause, ClauseFailure, ClauseSkipped, check, declare, registry, select
from .interface import AdapterSpec, Implementation, ImplementationBase

__all__ = [
    "AdapterSpec", "Clause", "ClauseFailure", "ClauseSkipped", "Implementation", "ImplementationBase",
    "check", "declare", "registry", "select",
]
