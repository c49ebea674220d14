"""Replaying a recorded sequence without hypothesis, and what is left after hypothesis' shrinking.

- :func:`replay`: re-run a trace through the op table (:func:`.ops.run_step`) with the invariants
  after every step: what reproducer scripts and tests call;
- :func:`delete_steps`: a step-deletion pass, used only when the shrink-time budget stopped
  hypothesis' own shrinker (which deletes steps itself when it runs to the end);
- :func:`seed_dependence`: which drawn seeds a finding needs: each seed is replaced in turn; a
  finding that disappears with another seed is reported with the draw that still shows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from conformance.clauses.interface import Implementation

from .config import MachineConfig, StepNotApplicable, Violation
from .driver import Driver
from .ops import render_step, run_step

#: replacements tried for a drawn seed (hypothesis draws seeds in 0..2**16)
ALTERNATIVE_SEEDS = (1, 12345)


def replay(impl: Implementation, config: dict[str, Any], steps: Sequence[dict[str, Any]], device: str = "cpu",
           verbose: Callable[[str], None] | None = None, exclude_invalid: Sequence[str] = ()) -> Violation | None:
    """Re-run a recorded sequence (``steps``; a leading ``create`` is skipped); the violation, if any.

    ``StepNotApplicable`` when a step could not have been drawn where it stands."""
    try:
        d = Driver(impl, MachineConfig.from_dict(config), device, verbose=verbose, exclude_invalid=exclude_invalid)
        d.recording = False
        for step in steps:
            if step["op"] != "create":
                run_step(d, step)
                d.check_invariants()
    except Violation as v:
        return v
    return None


def _same(impl: Implementation, key: tuple[str, str], config: dict[str, Any], steps: Sequence[dict[str, Any]],
          device: str, exclude_invalid: Sequence[str]) -> Violation | None:
    """The violation with ``key`` (clause, step kind) the candidate shows, else None (a candidate the replay
    refuses is None)."""
    try:
        v = replay(impl, config, steps, device, exclude_invalid=exclude_invalid)
    except StepNotApplicable:
        return None
    except Exception:  # noqa: BLE001  (a candidate that breaks the replay is just rejected)
        return None
    return v if v is not None and v.key == key else None


def delete_steps(impl: Implementation, v: Violation, device: str = "cpu", budget_s: float = 10.0,
                 exclude_invalid: Sequence[str] = ()) -> Violation:
    """Delete steps from a failing sequence while it still violates the same clause by the same kind of step
    (one replay each)."""
    deadline = time.monotonic() + budget_s
    best, improved = v, True
    while improved and time.monotonic() < deadline:
        improved = False
        steps = [s for s in best.trace if s["op"] != "create"]
        for i in reversed(range(len(steps))):
            if time.monotonic() > deadline:
                break
            nv = _same(impl, best.key, best.config, steps[:i] + steps[i + 1:], device, exclude_invalid)
            if nv is not None and len(nv.trace) < len(best.trace):
                best, improved = nv, True
                break
    return best


def seed_dependence(impl: Implementation, v: Violation, device: str = "cpu", budget_s: float = 5.0,
                    exclude_invalid: Sequence[str] = ()) -> list[str]:
    """For each drawn seed of the minimal sequence (the layer's and each step's), whether the finding
    needs it: one line per seed it needs, naming the draw that still shows it and those that do not."""
    deadline = time.monotonic() + budget_s
    steps = [s for s in v.trace if s["op"] != "create"]
    out: list[str] = []
    for i in range(-1, len(steps)):
        if time.monotonic() > deadline:
            out.append("(seed dependence: time budget spent before every seed was tried)")
            break
        seed = v.config["seed"] if i < 0 else steps[i].get("seed")
        if seed is None:
            continue
        lost = []
        for alt in ALTERNATIVE_SEEDS:
            if alt == seed:
                continue
            cfg = {**v.config, "seed": alt} if i < 0 else v.config
            cand = steps if i < 0 else [*steps[:i], {**steps[i], "seed": alt}, *steps[i + 1:]]
            if _same(impl, v.key, cfg, cand, device, exclude_invalid) is None:
                lost.append(alt)
        if lost:
            what = "the layer (create)" if i < 0 else f"step {i + 1} ({render_step(steps[i])})"
            out.append(f"depends on hypothesis' draw seed={seed} of {what}: seed={seed} shows it, "
                       f"seed={', '.join(map(str, lost))} does not")
    return out
