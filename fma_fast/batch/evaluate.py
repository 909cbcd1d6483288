"""Scoring one feature file with a saved model, in memory: what ``fma-fast eval`` runs. Large
or many inputs go through :func:`fma_fast.score` instead (resumable, a chunk at a time)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..core.metrics import TOP_K_REPORTED, ClassificationCounts, warn_if_collapsed
from ..core.model import normalizes, solve_settings
from ..core.names import Backend, Precision
from ..io import checkpoint
from ..io.features import check_same_origin, data_record, read_features
from ..solver.api import SolveResult, solve

PREDICTIONS_FORMAT = "fma_fast/predictions/1"
"""The format tag of a predictions file (``fma-fast eval --out``)."""


@dataclass
class Evaluation:
    """The summary ``eval`` prints (M, h, rows, path, rows normalised and, with labels, the
    accuracy at M and at M=0) and the solve's predictions."""

    summary: dict[str, Any]
    result: SolveResult

    def predictions(self) -> dict[str, Any]:
        """The predictions file's content: the summary, the top-1 and the top-k per row."""
        return {
            "format": PREDICTIONS_FORMAT,
            **self.summary,
            "pred": self.result.pred.tolist(),
            "topk_indices": self.result.topk_indices.tolist(),
            "topk_values": self.result.topk_values.tolist(),
        }


def evaluate_file(
    features: str | os.PathLike,
    model: str | os.PathLike,
    *,
    steps: int | None = None,
    step_size: float | None = None,
    topk: int = 1,
    normalize: bool | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
) -> Evaluation:
    """Score feature file ``features`` with the model folder ``model``: M, h and whether rows
    are normalised come from the arguments, else from what the model carries; the file must
    come from the data the model was trained on (its source and class table), when the model
    says. Labelled rows give the accuracy at M and at M=0 from the same pass."""
    network = checkpoint.load(model)  # carries M, h and normalize: the rules of score
    steps, step_size = solve_settings(network, steps, step_size)
    if steps is None:
        raise ValueError(f"{model} has no M chosen on val; pass --steps")
    data, normalized_rows = read_features(features, normalize=normalizes(network, normalize))
    if isinstance(network.trained_on, dict):
        check_same_origin(
            {f"the data model {model} was trained on": network.trained_on,
             Path(features).name: data_record(data)}
        )
    labelled = data.labels is not None
    classes = data.class_features.shape[0]
    wide = max(topk, min(TOP_K_REPORTED, classes)) if labelled else topk
    result = solve(data.features, network, steps, topk=wide, precision=precision,
                   backend=backend, zero_shot=labelled, step_size=step_size,
                   class_features=data.class_features, device=device)
    summary = {"steps": steps, "step_size": step_size, "rows": len(result.pred),
               "path": result.path, "normalized_rows": normalized_rows}
    warn_if_collapsed(result.pred, classes, f"eval {Path(features).name}", data.class_names)
    if labelled:  # M=0 scored in the same pass over the states
        summary.update(ClassificationCounts.of(result.topk_indices, data.labels)
                       .summary(data.class_names))
        summary["accuracy_at_m0"] = float((result.zero_shot_pred == data.labels).double().mean())
        result = replace(result, topk_values=result.topk_values[:, :topk],
                         topk_indices=result.topk_indices[:, :topk])
    return Evaluation(summary, result)
