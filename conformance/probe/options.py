"""The clone probe's command-line options, torch-free: ``python -m conformance probe clone --help`` answers
without importing torch (the probe itself, ``conformance.probe.clone``, is imported once they parse)."""

from __future__ import annotations

import argparse

#: the first paragraph of ``conformance.probe.clone``'s docstring (the help's description)
DESCRIPTION = ("Probe: is the defensive ``result = result.clone()`` before adding the adapter output still "
               "needed?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to probe (default cpu)")
    parser.add_argument("--json", metavar="OUT", help="write the full report (cases, verdict, environment) here")
    parser.add_argument("--compare", metavar="BASELINE", help="report per-case changes against a baseline JSON; "
                        "exit 1 if a case went from works to raises/wrong")
    parser.add_argument("--bits", type=int, action="append", choices=[4, 8], help="only these bit widths")
    parser.add_argument("--quiet", action="store_true", help="no table, only the verdict (and the comparison)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while probing (default 1: the "
                        "shapes are tiny, more threads only add overhead; 0 keeps torch's setting)")
