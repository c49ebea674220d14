"""Core types shared by every part of the package (standard library only, no torch).

The top of the layer order: every part may import ``conformance.core``, and it imports nothing of the
package. nox's own interpreter (``conformance.ci``) and the torch-free commands of the CLI use it.

- :mod:`.outcome`: ``Outcome`` (a clause's outcome, its JSON string as value) and what each outcome means
  for a run: a failure, the exit status, an xfail entry, aggregation; the exit codes of ``conformance run``.
- :mod:`.report`: the report's typed records (``Result``, ``Family``, ``Report``) with ``to_json``/``from_json``, the one
  reader of report files (schema "2", and "1" as stored in ``baselines/``).
- :mod:`.join`: the one joiner of reports (``python -m conformance join`` and the matrix report).
"""
