"""THE observed/bound ratio: every clause that compares a number with an analytic bound reports this.

``ratio = |observed - expected| / bound`` elementwise, then the maximum. Conventions (NaN-safe, so a
broken implementation can never look conforming):

- ``0 / 0 -> 0`` (an exact result where nothing could go wrong);
- ``x / 0 -> inf`` for ``x > 0`` (a difference where none is allowed);
- a non-finite error (the observed value is NaN or +-inf) -> ``inf``;
- a NaN bound (no bound could be computed) -> ``inf``; an infinite bound with a finite error -> 0.

So the worst ratio is ``<= 1`` exactly when every element is within its bound, and never NaN.
"""

from __future__ import annotations

import math

import torch

INF = math.inf


def ratios(err: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """Elementwise ``err / bound`` (float64, broadcast) with the module's conventions."""
    err = torch.as_tensor(err).detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).detach().double().cpu()
    err, bound = torch.broadcast_tensors(err, bound)
    pos = bound > 0
    r = torch.where(pos, err / torch.where(pos, bound, torch.ones_like(bound)),
                    torch.where(err > 0, torch.full_like(err, INF), torch.zeros_like(err)))
    bad = ~torch.isfinite(err) | torch.isnan(bound) | torch.isnan(r)
    return torch.where(bad, torch.full_like(r, INF), r)


def worst(err: torch.Tensor, bound: torch.Tensor | float) -> tuple[float, int]:
    """(max ratio, flat index of the element reaching it); (0.0, -1) for an empty tensor."""
    r = ratios(err, bound).flatten()
    if r.numel() == 0:
        return 0.0, -1
    i = int(r.argmax())
    return float(r[i]), i


def max_ratio(err: torch.Tensor, bound: torch.Tensor | float) -> float:
    """The worst ratio alone."""
    return worst(err, bound)[0]


def observed(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor | float) -> float:
    """Worst ``|got - exact| / bound`` (``got`` in any dtype/device, compared in float64 on the CPU)."""
    return max_ratio((got.detach().double().cpu() - exact.detach().double().cpu()).abs(), bound)


def compare(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> tuple[float, str]:
    """(worst ratio, where it is: got vs expected +- bound); a shape mismatch is ratio inf."""
    exact, bound = exact.detach().double().cpu(), bound.detach().double().cpu()
    if got.shape != exact.shape:
        return INF, f"shape {tuple(got.shape)} != expected {tuple(exact.shape)}"
    g = got.detach().double().cpu()
    err = (g - exact).abs()
    if not torch.isfinite(err).all():
        return INF, f"non-finite values ({int((~torch.isfinite(err)).sum())} entries)"
    r, i = worst(err, bound)
    if i < 0:
        return r, "empty"
    return r, (f"entry {i}: got {g.flatten()[i].item():.6g}, expected {exact.flatten()[i].item():.6g} "
               f"+- {bound.expand_as(exact).flatten()[i].item():.3g}")


def locate(err: torch.Tensor, bound: torch.Tensor, what: str) -> tuple[float, str]:
    """(worst ratio, ``what[index]: |stored - exact| e vs bound b``) for a weight-like tensor."""
    if not torch.isfinite(err).all():
        return INF, f"{what} has non-finite entries"
    r, i = worst(err, bound)
    if i < 0:
        return 0.0, ""
    idx = [int(v) for v in torch.unravel_index(torch.tensor(i), err.shape)]
    b = torch.as_tensor(bound, dtype=torch.float64).expand_as(err).flatten()[i]
    return r, f"{what}{idx}: |stored - exact| {float(err.flatten()[i]):.3g} vs bound {float(b):.3g}"


def stored_vs_exact(
    w_act: torch.Tensor, w_ex: torch.Tensor, ew: torch.Tensor, what: str,
    b_act: torch.Tensor | None = None, b_ex: torch.Tensor | None = None, eb: torch.Tensor | None = None,
) -> tuple[float, str]:
    """Worst ratio of a stored weight (and bias, when given) against exact values and bounds, and where."""
    worst_r, where = locate((w_act - w_ex).abs(), ew, what)
    if b_act is not None and b_ex is not None and eb is not None:
        rb, wb = locate((b_act - b_ex).abs(), eb, "bias")
        if rb > worst_r:
            worst_r, where = rb, wb
    return worst_r, where
