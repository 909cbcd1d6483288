"""Solving over processes launched by ``torchrun`` (:mod:`fma_fast.core.distributed`): each
rank takes a share of the rows and results are gathered in rank order, so a job gives the same
answer on 1 or N processes. M and h come as for :func:`~fma_fast.solver.api.solve`: the
arguments, then what the model carries (:func:`~fma_fast.core.model.solve_settings`)."""

from __future__ import annotations

import torch

from ..core.distributed import SINGLE, Context
from ..core.names import Backend, Precision
from .api import SolveResult, accuracy_by_steps, solve, trajectory_settings


def _cat(parts: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    present = [part for part in parts if part is not None]
    return torch.cat(present) if present else like


def solve_sharded(
    features: torch.Tensor,
    model,
    steps: int | None = None,
    *,
    class_features: torch.Tensor,
    context: Context = SINGLE,
    topk: int = 1,
    step_size: float | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
) -> SolveResult:
    """:func:`fma_fast.solve` with this rank solving its share of the rows; every rank gets
    the full result, rows in their original order."""
    share = features[context.rows(features.shape[0])]
    local = None
    if share.shape[0]:
        result = solve(
            share,
            model,
            steps,
            step_size=step_size,
            class_features=class_features,
            topk=topk,
            device=device,
            precision=precision,
            backend=backend,
        )
        local = (result.topk_values.cpu(), result.topk_indices.cpu(), result.path)
    parts = [part for part in context.gather(local) if part is not None]
    values = _cat([p[0] for p in parts], torch.empty(0, topk))
    indices = _cat([p[1] for p in parts], torch.empty(0, topk, dtype=torch.long))
    return SolveResult(
        pred=indices[:, 0].clone(), topk_values=values, topk_indices=indices, path=parts[0][2]
    )


def accuracy_by_steps_sharded(
    model,
    features: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    *,
    context: Context = SINGLE,
    max_steps: int | None = None,
    step_size: float | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
) -> list[float]:
    """:func:`fma_fast.accuracy_by_steps` over every rank's share: correct counts are summed."""
    max_steps, step_size = trajectory_settings(model, max_steps, step_size)
    share = context.rows(features.shape[0])
    counts = [0] * (max_steps + 1)
    rows = features[share].shape[0]
    if rows:
        accuracy = accuracy_by_steps(
            model,
            features[share],
            labels[share],
            class_features,
            max_steps=max_steps,
            step_size=step_size,
            device=device,
            precision=precision,
            backend=backend,
        )
        counts = [round(a * rows) for a in accuracy]
    totals = [sum(column) for column in zip(*context.gather(counts))]
    return [total / features.shape[0] for total in totals]
