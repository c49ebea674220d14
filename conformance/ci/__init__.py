"""CI tooling behind the nox sessions: run it with nox (``nox -s gpu -- --offline``) or without
(``python -m conformance.ci gpu --offline --out DIR``). Standard library only, and no torch at
import: it runs under nox's interpreter and asks other interpreters about torch in subprocesses.

- :mod:`.options`: the command line, one subcommand per nox session (``-- --help`` is answered here);
- :mod:`.envs`: environment creation and reuse (a stamp of the pin set), pip progress and heartbeat;
- :mod:`.steps`: the step runner (a failing step fails the run at the end, never silently);
- :mod:`.interpreters`: interpreter, torch and GPU probing (in subprocesses);
- :mod:`.baselines`: which stored baseline a run compares with;
- :mod:`.postprocess`: reading report summaries and the clone verdict;
- :mod:`.sessions` (tests, report, lint, bench, compare, stateful), :mod:`.gpu`, :mod:`.cell`
  (one matrix cell), :mod:`.regress`: the commands;
- :mod:`.matrix`: the version matrix (the one list of cells), :mod:`.matrix_report`: joining cells.

These modules work on a checkout (constraints/, suites/, baselines/), not on an installed wheel.
"""
