"""The hypothesis state machine over an adapter layer's lifecycle (clauses STATE-*).

Modelled on zarr's store state-machine tests: an ``@initialize`` rule builds a :class:`~.driver.Driver`
(layer + float64 model) from a drawn :class:`~.config.MachineConfig`; one ``@rule`` draws an op among
those that apply now (:func:`.ops.drawable`, weighted) and then its arguments (``op.draw``) and runs
it (:func:`.ops.run_step`); one ``@invariant`` checks what every step keeps
(``Driver.check_invariants``). Hypothesis generates, and shrinks a failing sequence by its own
moves (deleting steps, simplifying draws); :mod:`.run` gives it a budget.

A violation the pass does not let raise (``Stats.raises``: every one in the exploring pass, all but the
shrink pass's target in a shrink pass) is recorded by the driver and the example goes on with a fresh
layer built as the example's first one (its trace starts again at ``create``): one violation never hides
another that the rest of the example would have shown (see :mod:`.run`).

A single weighted rule rather than one ``@rule`` per op: hypothesis' per-rule selection (with swarm
testing, which switches rules off per example) cannot weight ops and starved merges and forwards in
the CI budget; the weights live in the op table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conformance.clauses.interface import Implementation, declared

from .config import MachineConfig, Stats, Violation, allowed_variants
from .driver import Driver
from .ops import OPS, SEEDS, drawable, run_step


def asdict(config: MachineConfig) -> dict[str, Any]:
    """The config's fields, shallow (its base stays a ``BaseCase``): ``MachineConfig(**asdict(c)) == c``.

    ``AdapterLayerMachine.create`` calls it as it called ``dataclasses.asdict`` when the config was flat: a
    derandomized run's hypothesis seed is a digest of the machine class's source (``function_digest`` in
    ``hypothesis.stateful.run_state_machine_as_test``), so that text stays as it was and the runs draw the same steps.
    """
    return {f.name: getattr(config, f.name) for f in fields(config)}


def make_machine(impl: Implementation, configs: Sequence[MachineConfig], device: str = "cpu",
                 stats: Stats | None = None, exclude_invalid: Sequence[str] = ()) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class driving ``impl``'s layers over ``configs``.

    ``exclude_invalid`` drops invalid-step kinds (to look past a known finding)."""
    stats = stats if stats is not None else Stats()
    caps = declared(impl).capabilities
    starts = [replace(c, variant=v) for c in configs
              for v in allowed_variants(c.method, caps, c.bias)]

    class AdapterLayerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            #: None once a fresh layer could not be built without a violation: the example's steps do nothing
            self.d: Driver | None = None

        def _build(self, config: MachineConfig) -> None:
            try:
                self.d = Driver(impl, config, device, stats, exclude_invalid=exclude_invalid)
            except Violation as v:
                if stats.raises(v):
                    raise
                self.d = None

        def _guarded(self, fn: Callable[[Driver], None]) -> None:
            """Run ``fn`` on the driver; a violation this pass does not raise goes on with a fresh layer."""
            d = self.d
            try:
                fn(d)
            except Violation as v:
                if stats.raises(v):
                    raise
                self._build(d.config)

        @initialize(config=st.sampled_from(starts), seed=SEEDS)
        def create(self, config: MachineConfig, seed: int) -> None:
            self._build(MachineConfig(**{**asdict(config), "seed": seed}))

        @rule(data=st.data())
        def step(self, data: st.DataObject) -> None:
            if self.d is None:
                return
            name = data.draw(st.sampled_from(drawable(self.d)), label="op")
            args = OPS[name].draw(data, self.d)
            self._guarded(lambda d: run_step(d, {"op": name, **args}))

        @invariant()
        def invariants(self) -> None:
            if self.d is not None:
                self._guarded(lambda d: d.check_invariants())

    AdapterLayerMachine.__name__ = AdapterLayerMachine.__qualname__ = f"AdapterLayerMachine_{impl.name}"
    return AdapterLayerMachine
