"""Feature files: one safetensors file with features, labels, the class table and class names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import _validation as check
from .checkpoint import atomic_write


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or inconsistent."""


@dataclass
class FeatureSet:
    """``features`` (N, D), ``labels`` (N,) or None, ``class_features`` (C, D), ``class_names``."""

    features: torch.Tensor
    labels: torch.Tensor | None
    class_features: torch.Tensor
    class_names: list[str] | None = None


def save_features(
    path: str | os.PathLike,
    features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Write a feature file atomically (temp file, then rename)."""
    x = check.check_matrix("features", features)
    z = check.check_matrix("class_features", class_features, dim=x.shape[1], dim_source="features")
    tensors = {
        "features": x.detach().cpu().contiguous(),
        "class_features": z.detach().cpu().contiguous(),
    }
    if labels is not None:
        tensors["labels"] = (
            check.check_labels("labels", labels, rows=x.shape[0], num_classes=z.shape[0])
            .cpu()
            .contiguous()
        )
    if class_names is not None and len(class_names) != z.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names for {z.shape[0]} classes")
    metadata = {"class_names": json.dumps(list(class_names))} if class_names is not None else {}
    path = Path(path)
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    return path


def load_features(path: str | os.PathLike, *, require_labels: bool = False) -> FeatureSet:
    """Read and validate a feature file written by :func:`save_features` (or by hand)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in keys}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise FeatureFileError(f"{path} is not a readable safetensors file: {error}") from None
    for key in ("features", "class_features"):
        if key not in keys:
            raise FeatureFileError(f"{path} has no tensor named {key!r} (found {sorted(keys)})")
    if require_labels and "labels" not in keys:
        raise FeatureFileError(f"{path} has no 'labels' tensor, which this command needs")
    try:
        x = check.check_matrix(f"{path.name}:features", tensors["features"])
        z = check.check_matrix(
            f"{path.name}:class_features",
            tensors["class_features"],
            dim=x.shape[1],
            dim_source=f"{path.name}:features",
        )
        labels = tensors.get("labels")
        if labels is not None:
            labels = check.check_labels(
                f"{path.name}:labels", labels, rows=x.shape[0], num_classes=z.shape[0]
            )
    except (TypeError, ValueError) as error:
        raise FeatureFileError(str(error)) from None
    names = None
    if "class_names" in metadata:
        try:
            names = json.loads(metadata["class_names"])
        except json.JSONDecodeError:
            raise FeatureFileError(f"{path}: class_names metadata is not a JSON list") from None
        if not isinstance(names, list) or len(names) != z.shape[0]:
            raise FeatureFileError(f"{path}: class_names must list {z.shape[0]} names")
    return FeatureSet(features=x, labels=labels, class_features=z, class_names=names)
