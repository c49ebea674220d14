"""The machinery that runs the spec: loading implementations, check contexts and per-family verdicts, worker
processes (fork server, fresh interpreters), results, reports, joins and xfail files.

It imports the spec (``conformance.spec``) and the built-in implementations (by name, through the loader); the spec
never imports it. ``results``, ``report``, ``join`` and ``xfails`` import no torch, so the CLI's listing, comparing
and rendering commands start fast.
"""
