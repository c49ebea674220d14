"""Did a call through ``torch.compile`` run compiled? A backend wrapper that counts the graphs dynamo hands it and
every run of the graphs it returns.

Why not dynamo's own counters (torch 2.13): ``torch._dynamo.testing.CompileCounterWithBackend`` (``frame_count``,
``op_count``) and ``torch._dynamo.utils.counters["stats"]`` (``calls_captured``, ``unique_graphs``) count
*compilations*. A call that reuses a cached graph (its guards passed) adds nothing to them, exactly as a call dynamo
ran eagerly (past ``torch._dynamo.config.recompile_limit``, under ``torch.compiler.disable``) adds nothing: they
cannot tell the two apart. Counting the runs of the compiled graphs can: a call ran compiled iff ``runs`` grew.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.backends.registry import lookup_backend


class CountingBackend:
    """A torch.compile backend: ``backend`` (a registered name, e.g. ``aot_eager``) compiles, this counts.

    ``graphs``: graphs dynamo captured and handed over (one per frame or per piece between graph breaks, again on
    every recompile); ``ops``: call nodes in them; ``runs``: calls of the compiled graphs."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.graphs = 0
        self.ops = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        self.ops += sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
        inner = lookup_backend(self.backend)(gm, example_inputs)

        @functools.wraps(inner)  # keeps the attributes dynamo reads (``_boxed_call``)
        def run(*args: Any, **kwargs: Any) -> Any:
            self.runs += 1
            return inner(*args, **kwargs)

        return run


def graph_breaks() -> int:
    """Graph breaks dynamo recorded since the last ``torch._dynamo.utils.counters.clear()`` (a measurement: a
    graph break is no eager fallback, the pieces around it still run compiled)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))
