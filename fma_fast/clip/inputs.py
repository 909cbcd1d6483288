"""What an extraction encodes, from its settings: the dataset, the encoder (through a PEFT
source when one is given) and the prompt templates (:class:`InputSettings`), and how a seed's
splits are encoded into the feature cache (:class:`ExtractOptions`). ``fma-fast extract`` and
``run`` build both from their options; Python callers build them directly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.distributed import Context
from ..core.names import Amp
from ..io.features import claim_folder, save_features
from .cache import ExtractedFeatures, extract, extraction_source
from .datasets import Dataset, load_dataset
from .encoder import load_encoder, register_model_config
from .peft import PeftEncoder, load_peft, peft_default_templates
from .prompts import resolve_templates
from .transforms import AUGMENT_SCALE


@dataclass(frozen=True)
class InputSettings:
    """The dataset (a name under ``root``, a class-per-folder directory or a CSV), the open_clip
    encoder and its weights, an optional PEFT checkpoint on top, and the templates (None: the
    dataset's, or the PEFT method's)."""

    dataset: str
    model: str
    root: str = "."
    allow_empty_classes: bool = False
    allow_unnamed_classes: bool = False
    checkpoint: str | None = None
    pretrained: str | None = None
    cache_dir: str | None = None
    model_config: str | None = None
    precision: Amp = "auto"
    templates: list[str] | None = None
    peft: str | None = None
    peft_checkpoint: str | None = None
    class_token_position: str = "end"
    workers: int | None = None
    """Image decoding processes (None: 8 on CUDA, 0 on the CPU)."""

    def load(self, device: torch.device, *, strict_classes: bool = True) -> Inputs:
        """The dataset, the encoder on ``device`` and the templates; ``strict_classes=False``
        lets a CoOp/CoCoOp context trained on other classes serve these (base-to-new)."""
        dataset = load_dataset(self.dataset, self.root,
                               allow_empty_classes=self.allow_empty_classes,
                               allow_unnamed=self.allow_unnamed_classes)
        model = register_model_config(self.model_config) if self.model_config else self.model
        if self.model_config and model != self.model:
            raise ValueError(
                f"--model-config {self.model_config} registers {model!r}, not {self.model!r}"
            )
        encoder = load_encoder(model, self.checkpoint, pretrained=self.pretrained,
                               cache_dir=self.cache_dir, device=device,
                               precision=self.precision)
        if self.peft is not None:
            encoder = PeftEncoder(load_peft(self.peft, self.peft_checkpoint, encoder,
                                            dataset.class_names, strict_classes=strict_classes,
                                            class_token_position=self.class_token_position))
        templates = resolve_templates(self.templates or peft_default_templates(self.peft),
                                      dataset.name)
        if self.workers is not None:
            workers = self.workers
        else:
            workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        return Inputs(dataset, encoder, templates, device, workers, self.model)


@dataclass
class Inputs:
    """A loaded dataset, encoder and templates, on ``device`` with ``workers`` decoders."""

    dataset: Dataset
    encoder: Any
    templates: list[str]
    device: torch.device
    workers: int
    model: str

    def describe(self) -> str:
        """One line: the dataset's classes and splits, the model, its weights and precision."""
        dataset, encoder = self.dataset, self.encoder
        return (
            f"dataset {dataset.name}: {len(dataset.class_names)} classes, {len(dataset.train)} "
            f"train / {len(dataset.val) if dataset.val is not None else 'no'} val / "
            f"{len(dataset.test)} test images; model {self.model} ({weights_label(encoder)}), "
            f"{encoder.precision} on {self.device}, input {encoder.preprocessing['size']}"
        )

    def claim(self, out: Path) -> dict[str, Any]:
        """Tie ``out`` to this extraction's source; an output folder of another is refused."""
        source = extraction_source(self.encoder, self.dataset, self.templates)
        claim_folder(out, source, "--out")
        return source


def weights_label(encoder) -> str:
    """Where an encoder's weights came from, short: the pretrained tag, then the digest."""
    tag, short = encoder.model_id.get("pretrained"), encoder.checkpoint[:19]
    return f"{tag} {short}" if tag else short


@dataclass(frozen=True)
class ExtractOptions:
    """How a seed's splits are encoded: augmented ``views`` per training image (random
    resized crops over ``crop_scale`` of the area), images per cache shard, crops per encoder
    call, what an unreadable image does, and whether progress bars show."""

    views: int = 10
    crop_scale: tuple[float, float] = AUGMENT_SCALE
    shard_size: int = 1024
    batch_size: int = 256
    on_error: str = "skip"
    progress: bool = True

    def extract(self, inputs: Inputs, folder: Path, *, shots: int, seed: int,
                context: Context) -> ExtractedFeatures:
        """One (shots, seed) draw's train/val/test features through the cache under
        ``folder``; the images skipped as unreadable are printed (rank 0)."""
        features = extract(
            inputs.encoder, inputs.dataset, folder, shots=shots, seed=seed, views=self.views,
            crop_scale=tuple(self.crop_scale), templates=inputs.templates,
            shard_size=self.shard_size, batch_size=self.batch_size, workers=inputs.workers,
            on_error=self.on_error, progress=self.progress, context=context,
        )
        for split, paths in features.skipped.items():
            if paths and context.is_main:
                print(f"skipped {len(paths)} unreadable {split} image(s), e.g. {paths[0]}")
        return features


def save_feature_files(features: ExtractedFeatures, out: Path, *, shots: int, seed: int,
                       test: bool = True) -> list[str]:
    """A draw's splits as feature files: ``out/seed<S>-k<K>/{train,val}.safetensors`` and, with
    ``test``, ``out/test.safetensors`` (the test split depends on neither seed nor K). Returns
    each file written with its row count."""
    written = []
    for split in ("train", "val", "test") if test else ("train", "val"):
        data = getattr(features, split)
        folder = out if split == "test" else out / f"seed{seed}-k{shots}"
        path = folder / f"{split}.safetensors"
        save_features(path, data.features, data.class_features, data.labels,
                      data.class_names, provenance=data.provenance)
        written.append(f"{path} ({data.features.shape[0]} rows)")
    return written
