"""Sample-adaptive early stopping for FMA's Euler solver (the paper's open problem).

A fixed M is a compromise: some rows are right after one step and drift away later, others
need all ten. Here each row stops on its own when its prediction is *stable* (unchanged for r
consecutive steps) or *confident* (max softmax probability at logit scale 100 ≥ τ, or top-1
minus top-2 cosine margin ≥ δ); a row that never triggers stops at ``max_steps``. The rule and
its threshold are chosen on val from a small grid, like M.

Everything is computed from one trajectory pass on the solver's fast path
(:func:`fma_fast.solver.api.trajectory_scores`): the per-step prediction, max probability and margin
of every row (:func:`trajectory_stats`), after which any rule is a cheap vectorised "first step
where it triggers" (:func:`stop_steps`). The rule is chosen on val by
:func:`fma_fast.core.policy.best_on_val`, as M is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core import validation as check
from ..core.names import Backend, check_choice
from ..core.policy import LOGIT_SCALE, best_on_val
from ..solver.api import trajectory_scores, trajectory_settings

Array = torch.Tensor | np.ndarray
RULES = ("stable", "prob", "margin")


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
        check_choice("kind", self.kind, RULES)
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
    the max softmax probability at logit scale 100, ``margin`` top-1 minus top-2 cosine, and,
    when labels were given, ``label_logprob`` the log-probability of each row's own class."""

    pred: torch.Tensor
    prob: torch.Tensor
    margin: torch.Tensor
    label_logprob: torch.Tensor | None = None

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


def trajectory_stats(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: Array,
    class_features: Array,
    labels: Array | None = None,
    *,
    max_steps: int | None = None,
    step_size: float | None = None,
    batch_size: int | None = None,
    backend: Backend = "auto",
) -> TrajectoryStats:
    """One pass over the Euler states (the solver's fast path, top-2 and log-sum-exp per
    state), keeping only the per-step statistics the stopping rules need; with ``labels``
    also each row's own-class log-probability (for the cross-entropy tie-break). h and
    ``max_steps`` None: as :func:`~fma_fast.solver.api.trajectory_scores` (the model's h, the
    M that reaches t=1)."""
    x = check.check_matrix("features", features)
    z = check.check_matrix("class_features", class_features, dim=x.shape[1], dim_source="features")
    if z.shape[0] < 2:
        raise ValueError("class_features needs at least 2 classes for a top-2 margin")
    scores = trajectory_scores(
        model, x, z, labels=labels, max_steps=max_steps, k=2, with_lse=True,
        step_size=step_size, batch_size=batch_size, backend=backend,
    )
    shape = (x.shape[0], trajectory_settings(model, max_steps, step_size)[0] + 1)
    pred = torch.empty(shape, dtype=torch.long, device=x.device)
    prob = torch.empty(shape, dtype=torch.float32, device=x.device)
    margin = torch.empty(shape, dtype=torch.float32, device=x.device)
    label_logprob = None if labels is None else torch.empty_like(prob)
    for rows, step, scored in scores:
        values = scored.values.to(x.device)
        pred[rows, step] = scored.indices[:, 0].to(x.device)
        margin[rows, step] = values[:, 0] - values[:, 1]
        prob[rows, step] = torch.exp(LOGIT_SCALE * values[:, 0] - scored.lse.to(x.device))
        if label_logprob is not None:
            label_logprob[rows, step] = (
                LOGIT_SCALE * scored.true_cosine - scored.lse).to(x.device)
    return TrajectoryStats(pred=pred, prob=prob, margin=margin, label_logprob=label_logprob)


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
    """The rule chosen on val, with every candidate's (rule, val accuracy, val cross-entropy,
    mean stop step)."""

    rule: StopRule
    accuracy: float
    mean_steps: float
    table: list[tuple[StopRule, float, float, float]]


def select_rule(
    stats: TrajectoryStats, labels: Array, grid: Sequence[StopRule] = DEFAULT_GRID
) -> RuleSelection:
    """Choose the rule on val by :func:`fma_fast.core.policy.best_on_val`: highest accuracy, then
    the lowest cross-entropy at the rows' stopping steps (when ``stats`` has the labels'
    log-probabilities), then the fewest mean steps, then grid order."""
    y = _check_row_labels(labels, stats.pred)
    if isinstance(grid, StopRule) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise ValueError(f"grid must be a non-empty sequence of StopRule, got {grid!r}")
    table = []
    for rule in grid:
        pred, steps = adaptive_predict(stats, rule)
        loss = 0.0
        if stats.label_logprob is not None:
            loss = -float(stats.label_logprob.gather(1, steps[:, None]).double().mean())
        table.append((rule, float((pred == y).double().mean()), loss,
                      float(steps.double().mean())))
    best = best_on_val([row[1] for row in table], [row[2] for row in table],
                       steps=[row[3] for row in table])
    rule, accuracy, _, mean_steps = table[best]
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
