"""Batch solving and scoring: stream test rows through the early-stopping Euler solver."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import _validation as check
from . import reference

DEFAULT_CHUNK_ROWS = {"cpu": 4096, "cuda": 65536}


@dataclass
class SolveResult:
    """Predictions of :func:`solve`: ``pred`` (N,), ``topk_values`` / ``topk_indices`` (N, k)
    (cosines, best first), and ``path``, the implementation that ran."""

    pred: torch.Tensor
    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    path: str


@dataclass
class StepSelection:
    """Accuracy after every M in 0..max_steps and the best M (the smallest among ties)."""

    best_steps: int
    accuracy: list[float]

    def table(self) -> str:
        lines = ["  M  accuracy"]
        for steps, acc in enumerate(self.accuracy):
            mark = "  <- best" if steps == self.best_steps else ""
            lines.append(f"{steps:>3}  {100 * acc:7.2f}%{mark}")
        return "\n".join(lines)


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


def _model_dim(model) -> int | None:
    return getattr(model, "dim", None) if isinstance(getattr(model, "dim", None), int) else None


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be a velocity network u(x, t), got {type(model).__name__}")


def _check_steps(steps, step_size) -> tuple[int, float]:
    steps = check.check_int("steps", steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    if steps * step_size > 1.0 + 1e-9:
        warnings.warn(
            f"steps * step_size = {steps * step_size:g} > 1: the solve runs past t=1, "
            "beyond the time range the field was trained on",
            stacklevel=3,
        )
    return steps, step_size


def _chunks(
    features: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Rows moved to the compute device one chunk at a time, each checked for NaN/Inf."""
    for start in range(0, features.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, features.shape[0]))
        chunk = features[rows].to(device, torch.float32, non_blocking=True)
        check.check_finite("features" if start == 0 else f"features[{start}:]", chunk)
        yield rows, chunk


def _prepare(features, model, class_features, batch_size, device, labels=None):
    _check_model(model)
    dim = _model_dim(model)
    x = check.check_matrix("features", features, dim=dim)
    tensors = {"features": x}
    z = None
    if class_features is not None:
        z = check.check_matrix(
            "class_features", class_features, dim=x.shape[1], dim_source="features"
        )
        tensors["class_features"] = z
    if labels is not None:
        tensors["labels"] = labels
    check.check_same_device(**tensors)
    if z is not None:
        check.check_finite("class_features", z)
    device = torch.device(device) if device is not None else (_model_device(model) or x.device)
    if batch_size is None:
        batch_size = DEFAULT_CHUNK_ROWS.get(device.type, 4096)
    batch_size = check.check_int("batch_size", batch_size, minimum=1)
    if z is not None:
        z = z.to(device, torch.float32)
    return x, z, batch_size, device


@torch.inference_mode()
def solve(
    features,
    model,
    steps: int,
    *,
    step_size: float = 0.1,
    class_features=None,
    topk: int = 1,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor | SolveResult:
    """Transport ``features`` (N, D) with M=``steps`` Euler steps of size ``step_size``.

    Without ``class_features`` returns the transported features (N, D). With a class table (C, D)
    returns a :class:`SolveResult` with the top-``topk`` cosine classes per row. Rows stream
    through ``device`` (default: the model's) ``batch_size`` at a time, so ``features`` may be
    a CPU tensor or numpy memmap larger than device memory; results come back on the
    features' device.
    """
    steps, step_size = _check_steps(steps, step_size)
    x, z, batch_size, device = _prepare(features, model, class_features, batch_size, device)
    if z is not None:
        topk = check.check_int("topk", topk, minimum=1)
        if topk > z.shape[0]:
            raise ValueError(f"topk must be <= the number of classes {z.shape[0]}, got {topk}")
        values = torch.empty(x.shape[0], topk, dtype=torch.float32, device=x.device)
        indices = torch.empty(x.shape[0], topk, dtype=torch.long, device=x.device)
    else:
        transported = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for rows, chunk in _chunks(x, batch_size, device):
        moved = reference.euler_solve(model, chunk, steps, step_size)
        if z is None:
            transported[rows] = moved.to(x.device)
        else:
            chunk_values, chunk_indices = reference.cosine_topk(moved, z, topk)
            values[rows], indices[rows] = chunk_values.to(x.device), chunk_indices.to(x.device)
    if z is None:
        return transported
    return SolveResult(
        pred=indices[:, 0].clone(), topk_values=values, topk_indices=indices, path="reference"
    )


@torch.inference_mode()
def accuracy_by_steps(
    model,
    features,
    labels,
    class_features,
    *,
    max_steps: int = 10,
    step_size: float = 0.1,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> list[float]:
    """Top-1 accuracy after every M in 0..max_steps, from one trajectory pass over the rows."""
    max_steps, step_size = _check_steps(max_steps, step_size)
    x, z, batch_size, device = _prepare(
        features,
        model,
        class_features,
        batch_size,
        device,
        labels=check.as_tensor("labels", labels),
    )
    y = check.check_labels("labels", labels, rows=x.shape[0], num_classes=z.shape[0])
    correct = torch.zeros(max_steps + 1, dtype=torch.long, device=device)
    for rows, chunk in _chunks(x, batch_size, device):
        truth = y[rows].to(device)
        trajectory = reference.euler_solve(
            model, chunk, max_steps, step_size, return_trajectory=True
        )
        for steps, state in enumerate(trajectory):
            pred = reference.cosine_logits(state, z).argmax(dim=-1)
            correct[steps] += (pred == truth).sum()
    return (correct.double() / x.shape[0]).tolist()


def select_steps(
    model,
    val_features,
    val_labels,
    class_features,
    max_steps: int = 10,
    step_size: float = 0.1,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> StepSelection:
    """Choose M on a validation split: the best accuracy over M in 0..max_steps, fewest steps
    among ties (the released code chose M on the test split, which leaks)."""
    accuracy = accuracy_by_steps(
        model,
        val_features,
        val_labels,
        class_features,
        max_steps=max_steps,
        step_size=step_size,
        batch_size=batch_size,
        device=device,
    )
    best = max(range(len(accuracy)), key=lambda steps: (accuracy[steps], -steps))
    return StepSelection(best_steps=best, accuracy=accuracy)
