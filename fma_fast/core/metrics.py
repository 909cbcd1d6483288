"""Classification metrics every output reports the same way (eval, score, run, predict):
top-1 and top-5 accuracy and per-class recall as fractions, from counts that add up over
parts and ranks; and the warning when every prediction is one class."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

TOP_K_REPORTED = 5
"""The wider accuracy reported next to top-1 (CLIP_benchmark's top-5), over min(5, C)."""


class CollapseWarning(UserWarning):
    """Every prediction of a job is one class: a broken or random encoder, or a classifier
    that does not fit these images."""


@dataclass
class ClassificationCounts:
    """Correct counts of labelled rows: top-1, top-5 (top-C when fewer classes), and per
    class the rows and top-1 hits. Counts, not fractions, so parts and ranks add up."""

    rows: int = 0
    top1: int = 0
    top5: int = 0
    per_class_rows: dict[int, int] = field(default_factory=dict)
    per_class_top1: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, topk_indices: torch.Tensor, labels: torch.Tensor) -> ClassificationCounts:
        """Counts of one batch: ``topk_indices`` (N, k) best first with k ≥ min(5, C)."""
        labels = labels.reshape(-1).long().cpu()
        indices = topk_indices.long().cpu()[:, :TOP_K_REPORTED]
        hits = indices == labels[:, None]
        top1 = hits[:, 0]
        classes, rows = labels.unique(return_counts=True)
        correct = torch.bincount(labels[top1], minlength=int(classes.max()) + 1 if len(classes)
                                 else 0)
        return cls(rows=len(labels), top1=int(top1.sum()), top5=int(hits.any(dim=1).sum()),
                   per_class_rows=dict(zip(classes.tolist(), rows.tolist())),
                   per_class_top1={c: int(correct[c]) for c in classes.tolist()})

    def __add__(self, other: ClassificationCounts) -> ClassificationCounts:
        def merged(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
            return {c: a.get(c, 0) + b.get(c, 0) for c in sorted({*a, *b})}

        return ClassificationCounts(
            self.rows + other.rows, self.top1 + other.top1, self.top5 + other.top5,
            merged(self.per_class_rows, other.per_class_rows),
            merged(self.per_class_top1, other.per_class_top1))

    def record(self) -> dict[str, Any]:
        """JSON-ready counts (class ids as strings), for part records that are summed later."""
        return {"rows": self.rows, "top1": self.top1, "top5": self.top5,
                "per_class_rows": {str(c): n for c, n in self.per_class_rows.items()},
                "per_class_top1": {str(c): n for c, n in self.per_class_top1.items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ClassificationCounts:
        return cls(record["rows"], record["top1"], record["top5"],
                   {int(c): n for c, n in record["per_class_rows"].items()},
                   {int(c): n for c, n in record["per_class_top1"].items()})

    def summary(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """Fractions: ``accuracy`` (top-1), ``top5_accuracy``, ``mean_per_class_recall`` and
        ``per_class_recall`` (by class name when given, else by index; classes without
        labelled rows are absent)."""
        if not self.rows:
            return {}
        recall = {c: self.per_class_top1.get(c, 0) / n for c, n in self.per_class_rows.items()}
        named = {(class_names[c] if class_names else str(c)): r for c, r in recall.items()}
        return {"accuracy": self.top1 / self.rows, "top5_accuracy": self.top5 / self.rows,
                "mean_per_class_recall": sum(recall.values()) / len(recall),
                "per_class_recall": named}


def collapse_message(rows: int, num_classes: int, only: int, where: str,
                     class_names: Sequence[str] | None = None) -> str | None:
    """The warning when every one of ``rows`` (two or more) predictions is class ``only`` of
    ``num_classes`` (two or more), else None: a broken or random encoder, or a collapsed
    field, looks like that. ``where`` (the job or file) heads the message when given."""
    if num_classes < 2 or rows < 2:
        return None
    shown = repr(class_names[only]) if class_names else f"{only} of {num_classes}"
    prefix = f"{where}: " if where else ""
    return (f"{prefix}all {rows:,} predictions are class {shown}; check the encoder, the class "
            "table and the model (on labelled images)")


def warn_if_collapsed(pred: torch.Tensor, num_classes: int, where: str,
                      class_names: Sequence[str] | None = None) -> str | None:
    """Warn (and return the message) when every one of several predictions ``pred`` is one
    class (:func:`collapse_message`)."""
    pred = pred.reshape(-1)
    if not pred.numel() or not bool((pred == pred[0]).all()):
        return None
    message = collapse_message(pred.numel(), num_classes, int(pred[0]), where, class_names)
    if message is not None:
        warnings.warn(message, CollapseWarning, stacklevel=2)
    return message
