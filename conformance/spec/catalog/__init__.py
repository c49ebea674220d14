"""The clause catalog: every clause declared as data, one module per area (torch-free).

Importing this package declares every clause; ``conformance.spec.clauses.catalog()`` returns them.
Modules are discovered, so adding an area is adding a file here and its checks in
``conformance.spec.checks``.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
