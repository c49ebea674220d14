"""The hypothesis state machine over an adapter layer's lifecycle (clauses STATE-*, issue #8).

Modelled on zarr's store state-machine tests: an ``@initialize`` rule builds a :class:`~.driver.Driver`
(layer + float64 model) from a drawn :class:`~.config.MachineConfig`; one ``@rule`` draws an op among
those that apply now (:func:`.ops.drawable`, weighted) and then its arguments (``op.draw``) and runs
it (:func:`.ops.run_step`); one ``@invariant`` checks what every step keeps
(``Driver.check_invariants``). Hypothesis generates, and shrinks a failing sequence by its own
moves (deleting steps, simplifying draws); :mod:`.run` gives it a budget.

A single weighted rule rather than one ``@rule`` per op: hypothesis' per-rule selection (with swarm
testing, which switches rules off per example) cannot weight ops and starved merges and forwards in
the CI budget; the weights live in the op table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conformance.spec.interface import Implementation

from .config import MachineConfig, Stats, allowed_variants
from .driver import Driver
from .ops import OPS, SEEDS, drawable, run_step


def make_machine(impl: Implementation, configs: Sequence[MachineConfig], device: str = "cpu",
                 stats: Stats | None = None, exclude_invalid: Sequence[str] = ()) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class driving ``impl``'s layers over ``configs``.

    ``exclude_invalid`` drops invalid-step kinds (to look past a known finding)."""
    stats = stats if stats is not None else Stats()
    caps = frozenset(impl.capabilities)
    starts = [MachineConfig(**{**asdict(c), "variant": v}) for c in configs
              for v in allowed_variants(c.method, caps, c.bias)]

    class AdapterLayerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.d: Driver | None = None

        @initialize(config=st.sampled_from(starts), seed=SEEDS)
        def create(self, config: MachineConfig, seed: int) -> None:
            self.d = Driver(impl, MachineConfig(**{**asdict(config), "seed": seed}), device, stats,
                            exclude_invalid=exclude_invalid)

        @rule(data=st.data())
        def step(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(drawable(self.d)), label="op")
            run_step(self.d, {"op": name, **OPS[name].draw(data, self.d)})

        @invariant()
        def invariants(self) -> None:
            self.d.check_invariants()

    AdapterLayerMachine.__name__ = AdapterLayerMachine.__qualname__ = f"AdapterLayerMachine_{impl.name}"
    return AdapterLayerMachine
