"""Core types shared by every part of the package (standard library only, no torch).

The top of the layer order: every part may import ``conformance.core``, and it imports nothing of the
package. nox's own interpreter (``conformance.ci``) and the torch-free commands of the CLI use it.

- :mod:`.outcome`: ``Outcome`` (a clause's outcome, its JSON string as value) and what each outcome means
  for a run: a failure, the exit status, an xfail entry, aggregation; the exit codes of ``conformance run``.
"""
