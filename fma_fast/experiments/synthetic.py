"""Seeded few-shot tasks with CLIP-like feature geometry, the test bed and the demo's default.

Geometry (docs/method.md §7): text features sit in a narrow cone around a text mean direction,
image features in another cone around an image mean direction, the two cones apart (the
modality gap). Each class has a text direction; its images come in several modes, each mode
pointing partly along its own class's text direction, partly along another class's text
direction (the entanglement that fools zero-shot scoring) and partly along a mode-specific
direction. ``difficulty`` in [0, 1] moves weight from the own-class part to the entangled part
and adds modes. Nothing here is tuned to any method's result.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core import protocol
from ..core import validation as check
from ..io.features import save_features

NUISANCE = 0.4


@dataclass
class Split:
    features: torch.Tensor
    labels: torch.Tensor


@dataclass
class FewShotTask:
    """Unit-norm image features per split, the (C, D) unit-norm class text table, class names."""

    train: Split
    val: Split
    test: Split
    class_features: torch.Tensor
    class_names: list[str]

    @property
    def dim(self) -> int:
        return self.class_features.shape[1]


def _unit(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def make_task(
    *,
    num_classes: int = 20,
    dim: int = 512,
    shots: int = 16,
    val_shots: int | None = None,
    test_per_class: int = 50,
    difficulty: float = 0.5,
    seed: int = 1,
) -> FewShotTask:
    """Build a K-shot task: ``shots`` train and min(shots, 4) val images per class (the
    literature's convention, :func:`fma_fast.core.protocol.val_shots`) unless ``val_shots`` is
    given, and ``test_per_class`` test images."""
    num_classes = check.check_int("num_classes", num_classes, minimum=2)
    dim = check.check_int("dim", dim, minimum=8)
    shots = check.check_int("shots", shots, minimum=1)
    val_shots = protocol.val_shots(shots) if val_shots is None else check.check_int(
        "val_shots", val_shots)
    test_per_class = check.check_int("test_per_class", test_per_class, minimum=1)
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
    generator = torch.Generator().manual_seed(seed)

    # Cone axes: the image axis is mostly orthogonal to the text axis (the modality gap).
    text_axis = _unit((dim,), generator)
    image_axis = F.normalize(0.2 * text_axis + _unit((dim,), generator), dim=-1)
    # Class text directions share a coarse "superclass" part, so classes are also close in text.
    groups = max(2, num_classes // 5)
    group_dirs = _unit((groups, dim), generator)
    class_group = torch.randint(groups, (num_classes,), generator=generator)
    class_dirs = F.normalize(
        0.6 * group_dirs[class_group] + _unit((num_classes, dim), generator), dim=-1
    )
    class_features = F.normalize(text_axis + 0.55 * class_dirs, dim=-1)

    modes = 1 + round(3 * difficulty)
    own, entangled = 0.7 - 0.3 * difficulty, 0.5 * difficulty
    specific = math.sqrt(max(0.05, 1.0 - own**2 - entangled**2))
    offset = torch.randint(1, num_classes, (num_classes, modes), generator=generator)
    other = (torch.arange(num_classes)[:, None] + offset) % num_classes
    mode_dirs = F.normalize(
        own * class_dirs[:, None]
        + entangled * class_dirs[other]
        + specific * _unit((num_classes, modes, dim), generator),
        dim=-1,
    )

    def sample(per_class: int) -> Split:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        mode = torch.randint(modes, (labels.numel(),), generator=generator)
        within = torch.randn(labels.numel(), dim, generator=generator, dtype=torch.float64)
        # Nuisance along the class text directions: what makes zero-shot degrade gradually.
        nuisance = (
            torch.randn(labels.numel(), num_classes, generator=generator, dtype=torch.float64)
            @ class_dirs
        )
        features = (
            image_axis
            + 0.85 * mode_dirs[labels, mode]
            + NUISANCE * nuisance / math.sqrt(num_classes)
            + 0.45 * within / math.sqrt(dim)
        )
        return Split(F.normalize(features, dim=-1).float(), labels)

    return FewShotTask(
        train=sample(shots),
        val=sample(val_shots),
        test=sample(test_per_class),
        class_features=class_features.float(),
        class_names=[f"class_{c:03d}" for c in range(num_classes)],
    )


def save_task(task: FewShotTask, paths: dict[str, os.PathLike], source: dict[str, Any]) -> None:
    """Each split named in ``paths`` (train, val, test) as a feature file: its rows and labels,
    the class table and names, and ``source`` with the split as its provenance."""
    for name, path in paths.items():
        split = getattr(task, name)
        save_features(path, split.features, task.class_features, labels=split.labels,
                      class_names=task.class_names, provenance={"source": source, "split": name})
