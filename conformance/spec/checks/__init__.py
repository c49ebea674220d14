"""Check modules. Importing this package registers every clause.

Each module here holds the checks of one area and registers them with ``@clause``; modules are
discovered, so adding an area is adding a file.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
