"""The machinery that runs the spec: loading implementations, per-family verdicts, worker
processes (fork server, fresh interpreters), results, reports and xfail files (the report's records and the
joiner of reports are ``conformance.core.report`` and ``conformance.core.join``).

It imports the clauses (``conformance.clauses``, whose ``context`` is the check API) and the built-in
implementations (by name, through the loader); the clauses never import it. ``results``, ``report`` and ``xfails`` import no torch, so the CLI's listing, comparing
and rendering commands start fast.
"""
