"""Sample-adaptive early stopping for FMA's Euler solver (the paper's open problem).

A fixed M is a compromise: some rows are right after one step and drift away later, others
need all ten. Here each row stops on its own when its prediction is *stable* (unchanged for r
consecutive steps) or *confident* (max softmax probability at logit scale 100 ≥ τ, or top-1
minus top-2 cosine margin ≥ δ); a row that never triggers stops at ``max_steps``. The rule and
its threshold are chosen on val from a small grid, like M.

Everything is computed from one trajectory pass: the per-step prediction, max probability and
margin of every row (:func:`trajectory_stats`), after which any rule is a cheap vectorised
"first step where it triggers" (:func:`stop_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import _validation as check
from . import reference

Array = torch.Tensor | np.ndarray
RULES = ("stable", "prob", "margin")
DEFAULT_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class StopRule:
    """Stop a row at the first step where the rule triggers.

    ``kind`` "stable": prediction unchanged over the last ``threshold`` steps (an int r ≥ 0;
    r=0 stops at step 0); "prob": max softmax(100·cos) ≥ ``threshold`` (τ; τ=0 stops at step 0,
    τ>1 never triggers); "margin": top-1 minus top-2 cosine ≥ ``threshold`` (δ).
    """

    kind: str
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"kind must be one of {RULES}, got {self.kind!r}")
        if self.kind == "stable":
            check.check_int("threshold (r, for 'stable')", self.threshold, minimum=0)
        else:
            check.check_positive_float("threshold", self.threshold, allow_zero=True)

    def __str__(self) -> str:
        symbol = {"stable": "r", "prob": "τ", "margin": "δ"}[self.kind]
        return f"{self.kind} {symbol}={self.threshold:g}"


DEFAULT_GRID: tuple[StopRule, ...] = (
    *(StopRule("stable", r) for r in (1, 2, 3, 4)),
    *(StopRule("prob", tau) for tau in (0.5, 0.8, 0.9, 0.95, 0.99)),
    *(StopRule("margin", delta) for delta in (0.01, 0.02, 0.05, 0.1, 0.15)),
)


@dataclass
class TrajectoryStats:
    """Per row and step m = 0..max_steps: ``pred`` (N, M+1) the cosine argmax class, ``prob``
    the max softmax probability at the logit scale, ``margin`` top-1 minus top-2 cosine."""

    pred: torch.Tensor
    prob: torch.Tensor
    margin: torch.Tensor

    @property
    def max_steps(self) -> int:
        return self.pred.shape[1] - 1

    def fixed_accuracy(self, labels: Array) -> list[float]:
        """Accuracy of every fixed M in 0..max_steps (what :func:`fma_fast.accuracy_by_steps`
        gives, here without another pass)."""
        y = _check_row_labels(labels, self.pred)
        return (self.pred == y[:, None]).double().mean(dim=0).tolist()


def _check_row_labels(labels, pred: torch.Tensor) -> torch.Tensor:
    # Any class index is accepted: the stats no longer know how many classes there were.
    return check.check_labels("labels", labels, rows=pred.shape[0], num_classes=2**62)


@torch.no_grad()
def trajectory_stats(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: Array,
    class_features: Array,
    *,
    max_steps: int = 10,
    step_size: float = 0.1,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    batch_size: int = 4096,
) -> TrajectoryStats:
    """One Euler trajectory pass (``reference.euler_solve``, ``batch_size`` rows at a time on the
    features' device), keeping only the per-step statistics the stopping rules need."""
    if not callable(model):
        raise TypeError(f"model must be a velocity network u(x, t), got {type(model).__name__}")
    x = check.check_matrix("features", features)
    z = check.check_matrix("class_features", class_features, dim=x.shape[1], dim_source="features")
    check.check_same_device(features=x, class_features=z)
    check.check_finite("class_features", z)
    max_steps = check.check_int("max_steps", max_steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    batch_size = check.check_int("batch_size", batch_size, minimum=1)
    if z.shape[0] < 2:
        raise ValueError("class_features needs at least 2 classes for a top-2 margin")
    z = z.float()
    shape = (x.shape[0], max_steps + 1)
    pred = torch.empty(shape, dtype=torch.long, device=x.device)
    prob = torch.empty(shape, dtype=torch.float32, device=x.device)
    margin = torch.empty(shape, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, x.shape[0]))
        chunk = x[rows].float()
        check.check_finite("features" if start == 0 else f"features[{start}:]", chunk)
        trajectory = reference.euler_solve(
            model, chunk, max_steps, step_size, return_trajectory=True
        )
        for step, state in enumerate(trajectory):
            cosine = reference.cosine_logits(state, z)
            top2 = cosine.topk(2, dim=-1)
            pred[rows, step] = top2.indices[:, 0]
            margin[rows, step] = top2.values[:, 0] - top2.values[:, 1]
            prob[rows, step] = F.softmax(logit_scale * cosine, dim=-1).amax(dim=-1)
    return TrajectoryStats(pred=pred, prob=prob, margin=margin)


def _triggers(stats: TrajectoryStats, rule: StopRule) -> torch.Tensor:
    """(N, M+1) bool: does the rule fire at step m?"""
    if rule.kind == "prob":
        return stats.prob >= rule.threshold
    if rule.kind == "margin":
        return stats.margin >= rule.threshold
    # Length of the run of unchanged predictions ending at each step.
    same = torch.zeros_like(stats.pred, dtype=torch.long)
    same[:, 1:] = (stats.pred[:, 1:] == stats.pred[:, :-1]).long()
    run = torch.zeros_like(same)
    for step in range(1, same.shape[1]):
        run[:, step] = (run[:, step - 1] + 1) * same[:, step]
    return run >= int(rule.threshold)


def stop_steps(stats: TrajectoryStats, rule: StopRule) -> torch.Tensor:
    """(N,) the step each row stops at: the first where ``rule`` fires, else ``max_steps``."""
    if not isinstance(rule, StopRule):
        raise TypeError(f"rule must be a StopRule, got {type(rule).__name__}")
    fires = _triggers(stats, rule)
    first = fires.int().argmax(dim=1)  # argmax returns the first maximum
    return torch.where(fires.any(dim=1), first, torch.full_like(first, stats.max_steps))


def adaptive_predict(stats: TrajectoryStats, rule: StopRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) predictions at each row's own stopping step, and (N,) those steps."""
    steps = stop_steps(stats, rule)
    return stats.pred.gather(1, steps[:, None])[:, 0], steps


@dataclass
class RuleSelection:
    """The rule chosen on val, with every candidate's (rule, val accuracy, mean stop step)."""

    rule: StopRule
    accuracy: float
    mean_steps: float
    table: list[tuple[StopRule, float, float]]


def select_rule(
    stats: TrajectoryStats, labels: Array, grid: Sequence[StopRule] = DEFAULT_GRID
) -> RuleSelection:
    """Choose the rule on val: highest accuracy, then fewest mean steps, then grid order."""
    y = _check_row_labels(labels, stats.pred)
    if isinstance(grid, StopRule) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise ValueError(f"grid must be a non-empty sequence of StopRule, got {grid!r}")
    table = []
    for rule in grid:
        pred, steps = adaptive_predict(stats, rule)
        table.append((rule, float((pred == y).double().mean()), float(steps.double().mean())))
    best = max(range(len(table)), key=lambda i: (table[i][1], -table[i][2], -i))
    rule, accuracy, mean_steps = table[best]
    return RuleSelection(rule=rule, accuracy=accuracy, mean_steps=mean_steps, table=table)


__all__ = [
    "DEFAULT_GRID",
    "RULES",
    "RuleSelection",
    "StopRule",
    "TrajectoryStats",
    "adaptive_predict",
    "select_rule",
    "stop_steps",
    "trajectory_stats",
]
