"""Deprecated: moved to ``conformance.clauses.stateful.ops`` (this name stays for old imports and the stored
reproducer scripts)."""

from conformance.spec import _alias

_alias(__name__)
