"""Baseline: the released FMA code's inference loop structure, written from its description.

Eager and unfolded: every step builds a per-row time column t of shape (N, 1), so the time MLP
and every adaLN Linear run once per row, then x += h·v. Kept as the speed baseline only.
"""

from __future__ import annotations

import torch

from fma_fast import VelocityNet


@torch.no_grad()
def released_solve(
    model: VelocityNet, x: torch.Tensor, steps: int, step_size: float = 0.1
) -> torch.Tensor:
    """M Euler steps of size h from t=0 with a per-row time column, as the released loop does."""
    t = torch.zeros(x.shape[0], 1, dtype=torch.float32, device=x.device)
    for _ in range(steps):
        x = x + step_size * model(x, t)
        t = t + step_size
    return x
