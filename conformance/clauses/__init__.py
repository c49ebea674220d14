"""The clauses: one package per area (``merge``, ``forward``, ``stateful``, ...), each with its torch-free
declarations (``declare``), its checks (``checks``), its own cases where it has any (``cases``) and its broken
twins (``broken``, deliberately broken implementations that show each clause can fail).

Shared by every area: the registry (``clause``: ``declare``, ``check``, ``catalog``, ``registry``), the
implementation protocol (``interface``), the check API (``context``: ``CheckContext`` and the assertion
helpers), the shared case records (``cases``), hypothesis strategies (``strategies``), budgets (``budget``) and
warning capture (``observe``).

Nothing here imports the harness that runs it (``conformance.harness``); importing this package imports no
torch.
"""

from .clause import Clause, ClauseFailure, ClauseSkipped, check, declare, registry, select
from .interface import AdapterSpec, Implementation, ImplementationBase

__all__ = [
    "AdapterSpec", "Clause", "ClauseFailure", "ClauseSkipped", "Implementation", "ImplementationBase",
    "check", "declare", "registry", "select",
]
