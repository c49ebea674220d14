"""Deprecated: moved to ``conformance.clauses.interface`` (this name stays for old imports)."""

from conformance.spec import _alias

_alias(__name__)
