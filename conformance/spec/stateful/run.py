"""Deprecated: moved to ``conformance.clauses.stateful.run`` (this name stays for old imports and the stored
reproducer scripts)."""

from conformance.spec import _alias

_alias(__name__)
