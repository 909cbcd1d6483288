"""The base of every PEFT feature source, and what the sources share: the error, the names of
the methods, and the checks of a file's tensors."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...core import validation as check
from ...io.files import file_sha256
from ..encoder import ClipEncoder

_LABELS = {"coop": "CoOp", "cocoop": "CoCoOp", "adapter": "CLIP-Adapter", "lora": "CLIP-LoRA"}


class PeftError(ValueError):
    """A PEFT checkpoint that cannot be read or does not fit the encoder (one-line message)."""


def shape_of(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def learned(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of a PEFT file, refused unless dense, floating, with data, finite and not
    empty: NaN weights would give NaN features, and a meta tensor has no values to merge."""
    return check.check_dense_float(
        f"{path}: {name}", tensor, finite=True, nonempty=True, error=PeftError
    )


def embed_dim(encoder: ClipEncoder) -> int:
    visual = encoder.model.visual
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        projection = getattr(encoder.model, "text_projection", None)
        dim = projection.shape[1] if isinstance(projection, torch.Tensor) else None
    if dim is None:
        raise PeftError(f"cannot tell the embedding width of {encoder.name}")
    return int(dim)


class PeftSource:
    """Features of one PEFT checkpoint on one encoder: unit-norm fp32 rows on the CPU."""

    method: str
    checkpoint_sha256: str

    def __init__(
        self,
        method: str,
        path: Path,
        encoder: ClipEncoder,
        class_names: Sequence[str],
        settings: dict[str, Any],
    ) -> None:
        self.method = method
        self.path = path
        self.encoder = encoder
        self.class_names = list(class_names)
        self.checkpoint_sha256 = file_sha256(path)
        self._settings = settings

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: method, checkpoint sha256 and the settings read from the file."""
        return {
            "method": self.method,
            "checkpoint_sha256": self.checkpoint_sha256,
            "encoder": dict(self.encoder.model_id),
            "n_classes": len(self.class_names),
            **copy.deepcopy(self._settings),
        }

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) unit fp32 image features for preprocessed pixels (B, 3, H, W)."""
        return self.encoder.encode_images(pixels)

    def class_features(self, templates: Sequence[str]) -> torch.Tensor:
        """(C, D) unit fp32 class features."""
        raise NotImplementedError

    def per_image_class_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C, D) per-image class features: CoCoOp only."""
        raise PeftError(
            f"{self.method} class features do not depend on the image; use class_features"
        )


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
