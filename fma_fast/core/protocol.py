"""The few-shot protocol of the CLIP literature, defined once: K random training shots per class
and min(K, 4) validation shots per class, drawn from a seed. The CLIP datasets, the synthetic
tasks and the report all sample through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import validation as check

VAL_SHOTS_CAP = 4
"""At most this many validation shots per class (the literature's min(K, 4))."""


def val_shots(shots: int) -> int:
    """Validation shots per class for K training shots: min(K, 4)."""
    return min(check.check_int("shots", shots, minimum=1), VAL_SHOTS_CAP)


def few_shot_indices(
    labels: torch.Tensor | Sequence[int],
    shots: int,
    generator: torch.Generator,
    *,
    strict: bool = True,
) -> torch.Tensor:
    """``shots`` random rows of every class, class by class in label order. A class with fewer
    rows is an error when ``strict``, else all of its rows are taken (real data sets have
    small classes)."""
    labels = torch.as_tensor(labels)
    shots = check.check_int("shots", shots, minimum=1)
    chosen = []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().flatten()
        if rows.numel() < shots and strict:
            raise ValueError(f"class {c} has {rows.numel()} rows in the pool, fewer than {shots}")
        chosen.append(rows[torch.randperm(rows.numel(), generator=generator)[:shots]])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def draw_split(
    train_labels: torch.Tensor | Sequence[int],
    val_labels: torch.Tensor | Sequence[int] | None,
    shots: int,
    seed: int,
    *,
    strict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The K-shot training rows and the min(K, 4)-shot validation rows of ``seed``.

    Validation shots come from the val pool; without one (``val_labels`` None) from the
    training rows not drawn as training shots, so M is never chosen on test rows. Returns the
    training indices, the validation indices and whether those index the training pool.
    """
    generator = torch.Generator().manual_seed(check.check_int("seed", seed))
    train = few_shot_indices(train_labels, shots, generator, strict=strict)
    if val_labels is not None:
        val = few_shot_indices(val_labels, val_shots(shots), generator, strict=strict)
        return train, val, False
    left = torch.ones(len(train_labels), dtype=torch.bool)
    left[train] = False
    rest = left.nonzero().flatten()
    picked = few_shot_indices(torch.as_tensor(train_labels)[rest], val_shots(shots), generator,
                              strict=strict)
    return train, rest[picked], True


SUBSAMPLES = ("all", "base-to-new")
"""Which classes an experiment uses: all of them, or the base-to-new split (train on base)."""


def base_and_new_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """The base-to-new generalisation split (CoCoOp's protocol): of the C classes of the class
    table, the first ceil(C/2) are base, the rest new. CoCoOp splits the labels present in
    its training set, which are all C in its datasets; counting the table instead keeps a
    class without training images (``--allow-empty-classes``) in its half rather than
    dropping it, and its test images with it, from both."""
    count = check.check_int("num_classes", num_classes, minimum=0)
    if count < 2:
        raise ValueError(f"base-to-new needs at least 2 classes, got {count}")
    half = -(-count // 2)
    return list(range(half)), list(range(half, count))


def harmonic_mean(base: float, new: float) -> float:
    """The base-to-new harmonic mean 2·b·n / (b + n) (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
