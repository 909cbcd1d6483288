"""The feature cache: safetensors shards, each stamped with what produced it, written atomically.

An interrupted extraction resumes: a shard is reused only when its stamp (model, checkpoint
sha256, preprocessing, dataset, split, seed, K, views, the exact images) matches what would be
computed now. Under ``torchrun`` the shards are dealt out to the ranks round-robin.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..core.distributed import SINGLE, Context
from ..core.names import check_choice
from ..core.progress import progress as progress_bar
from ..io.features import FeatureSet, claim_folder
from ..io.files import loads_json, save_safetensors
from .datasets import Dataset, Item, few_shot
from .encoder import ClipEncoder
from .transforms import (
    AUGMENT_SCALE,
    Preprocess,
    open_image,
    require_image_libraries,
    view_generator,
)

CACHE_FORMAT = "fma_fast/clip-features/1"
ON_ERROR = ("skip", "fail")
_STAMP_KEY = "fma_fast_cache"


@dataclass
class SplitFeatures:
    """One split's image features: ``views`` consecutive rows per image (image-major), labels
    per row, the image each row came from (its index in the split's item list), and the
    images skipped as unreadable."""

    features: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    views: int
    skipped: list[str] = field(default_factory=list)
    stamp: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractedFeatures:
    """train (V rows per image), val and test (None when not asked for), ready for
    :func:`fma_fast.fit` and the solver."""

    train: FeatureSet
    val: FeatureSet
    test: FeatureSet | None
    skipped: dict[str, list[str]]


def _items_sha256(items: Sequence[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.path}\t{item.label}\n".encode())
    return digest.hexdigest()


def dataset_sha256(dataset: Dataset) -> str:
    """A digest of a dataset's class names and of every split's images and labels."""
    digest = hashlib.sha256(json.dumps(list(dataset.class_names)).encode())
    for split in (dataset.train, dataset.val or [], dataset.test):
        digest.update(_items_sha256(split).encode())
    return digest.hexdigest()


def extraction_source(
    encoder: ClipEncoder, dataset: Dataset, templates: Sequence[str]
) -> dict[str, Any]:
    """Everything an extraction's features depend on whatever the split, seed or K: the
    provenance shared by the feature files of one source."""
    return {
        "kind": "clip-extraction",
        "format": CACHE_FORMAT,
        **encoder.model_id,
        "preprocessing": Preprocess.from_encoder(encoder).describe(train=False),
        "dataset": dataset.name,
        "dataset_sha256": dataset_sha256(dataset),
        "templates": list(templates),
    }


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            stamp = loads_json((handle.metadata() or {})[_STAMP_KEY], f"{path}'s stamp")
    except (SafetensorError, OSError, ValueError, KeyError):  # JsonError is a ValueError
        return None
    return stamp if isinstance(stamp, dict) else None


class _ImageViews(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per index; an unreadable image yields its error."""

    def __init__(self, dataset: Dataset, items, preprocess: Preprocess, views, augment, seed):
        self.root, self.items, self.preprocess = dataset.image_root, items, preprocess
        self.views, self.augment, self.seed = views, augment, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        try:
            image = open_image(self.root / item.path)
        except Exception as error:  # PIL raises many types for missing, broken or odd files
            blank = torch.zeros(self.views, 3, *self.preprocess.size)
            return position, blank, f"{type(error).__name__}: {error}"
        if self.augment:
            pixels = self.preprocess.views(image, self.views, view_generator(self.seed, item.path))
        else:
            pixels = self.preprocess.centre(image)[None]
        return position, pixels, ""


@dataclass
class _Plan:
    """Where each shard of a split lives and the stamp it must carry to be reused."""

    folder: Path
    items: Sequence[Item]
    shard_size: int
    common: dict[str, Any]

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.items) / self.shard_size)

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.items)))

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}-of-{self.num_shards:05d}.safetensors"

    def stamp(self, shard: int) -> dict[str, Any]:
        part = [self.items[i] for i in self.rows(shard)]
        return {"common": self.common, "shard": shard, "items_sha256": _items_sha256(part)}


def _matches(found: dict[str, Any] | None, expected: dict[str, Any]) -> bool:
    return found is not None and {key: found.get(key) for key in expected} == expected


def extract_split(
    encoder: ClipEncoder,
    dataset: Dataset,
    items: Sequence[Item],
    split: str,
    folder: str | os.PathLike,
    *,
    seed: int | None = None,
    shots: int | None = None,
    views: int = 1,
    crop_scale: tuple[float, float] = AUGMENT_SCALE,
    shard_size: int = 1024,
    batch_size: int = 256,
    workers: int = 0,
    on_error: str = "skip",
    progress: bool = True,
    context: Context = SINGLE,
) -> SplitFeatures:
    """Encode ``items`` into shards under ``folder`` (reusing finished ones) and load them.

    The "train" split gets ``views`` augmented views per image (random resized crop of
    ``crop_scale`` of the area + flip, seeded by ``seed`` and the image); other splits one
    centre-crop pass. ``batch_size``
    counts encoded crops. ``on_error="skip"`` skips and counts unreadable images, ``"fail"``
    stops at the first. ``workers`` decoding processes never change the result.
    """
    check_choice("on_error", on_error, ON_ERROR)
    if not items:
        raise ValueError(f"{dataset.name} has no {split} images")
    for name, value in (("views", views), ("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    augment = split == "train"
    views = views if augment else 1
    preprocess = Preprocess.from_encoder(encoder, scale=crop_scale)
    common = {
        "format": CACHE_FORMAT,
        **encoder.model_id,
        "preprocessing": preprocess.describe(train=augment),
        "dataset": dataset.name,
        "split": split,
        "seed": seed,
        "shots": shots,
        "views": views,
        "augment": augment,
        "images": len(items),
        "shard_size": shard_size,
    }
    plan = _Plan(Path(folder), items, shard_size, common)
    mine = [
        shard
        for shard in range(context.rank, plan.num_shards, context.world_size)
        if not _matches(_read_stamp(plan.path(shard)), plan.stamp(shard))
    ]
    if mine:
        require_image_libraries()
        images = _ImageViews(dataset, items, preprocess, views, augment, seed)
        _encode_shards(
            encoder,
            images,
            plan,
            mine,
            images_per_batch=max(1, batch_size // views),
            workers=workers,
            on_error=on_error,
            progress=progress and context.is_main,
        )
    context.barrier()
    shards = range(plan.num_shards)
    return _load_shards([plan.path(s) for s in shards], [plan.stamp(s) for s in shards], on_error)


def _encode_shards(
    encoder: ClipEncoder,
    images: _ImageViews,
    plan: _Plan,
    shards: list[int],
    *,
    images_per_batch: int,
    workers: int,
    on_error: str,
    progress: bool,
) -> None:
    """Encode the given shards; each is written as soon as its last batch is done."""
    batches, owner = [], []
    for shard in shards:
        rows = list(plan.rows(shard))
        for start in range(0, len(rows), images_per_batch):
            batches.append(rows[start : start + images_per_batch])
            owner.append(shard)
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=encoder.device.type == "cuda",
    )
    bar = progress_bar(total=sum(len(batch) for batch in batches),
                       desc=f"encode {plan.common['split']}", unit="img", enabled=progress)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    skipped: list[str] = []
    for number, (positions, pixels, errors) in enumerate(loader):
        for position, message in zip(positions.tolist(), errors):
            if message:
                path = images.items[position].path
                if on_error == "fail":
                    raise ValueError(
                        f"cannot read image {images.root / path} ({message}); "
                        "pass on_error='skip' (--on-error skip) to skip unreadable images"
                    )
                skipped.append(path)
        ok = torch.tensor([not message for message in errors])
        if bool(ok.any()):
            parts.append((encoder.encode_images(pixels[ok].flatten(0, 1)), positions[ok]))
        bar.update(len(positions))
        shard = owner[number]
        if number + 1 == len(batches) or owner[number + 1] != shard:
            _write_shard(plan.path(shard), plan.stamp(shard), parts, skipped, images.items)
            parts, skipped = [], []
    bar.close()


def _write_shard(path: Path, stamp, parts, skipped: list[str], items: Sequence[Item]) -> None:
    positions = torch.cat([p for _, p in parts]) if parts else torch.empty(0, dtype=torch.long)
    features = torch.cat([f for f, _ in parts]) if parts else torch.empty(0, 0)
    tensors = {
        "features": features.float().contiguous(),
        "image_index": positions.long().contiguous(),
        "labels": torch.tensor([items[p].label for p in positions.tolist()], dtype=torch.long),
    }
    metadata = {_STAMP_KEY: json.dumps({**stamp, "skipped": skipped}, sort_keys=True)}
    save_safetensors(path, tensors, metadata)


def _load_shards(paths: list[Path], stamps: list[dict[str, Any]], on_error: str) -> SplitFeatures:
    features, labels, index, skipped = [], [], [], []
    for path, expected in zip(paths, stamps):
        stamp = _read_stamp(path)
        if not _matches(stamp, expected):
            raise ValueError(
                f"feature shard {path} is missing or was written for other settings; "
                "run the extraction again (finished shards are kept)"
            )
        with safe_open(str(path), framework="pt") as handle:
            features.append(handle.get_tensor("features"))
            labels.append(handle.get_tensor("labels"))
            index.append(handle.get_tensor("image_index"))
        skipped += stamp.get("skipped", [])
    if skipped and on_error == "fail":
        raise ValueError(
            f"{len(skipped)} image(s) were skipped as unreadable when this cache was written "
            f"(first: {skipped[0]}); fix them and delete {paths[0].parent}, or pass on_error='skip'"
        )
    views = stamps[0]["common"]["views"]
    image_index = torch.cat(index)
    if image_index.numel() == 0:
        raise ValueError(f"no readable images in {paths[0].parent} ({len(skipped)} skipped)")
    return SplitFeatures(
        features=torch.cat([f for f in features if f.numel()]),
        labels=torch.cat(labels).repeat_interleave(views),
        image_index=image_index.repeat_interleave(views),
        views=views,
        skipped=skipped,
        stamp=stamps[0]["common"],
    )


def load_split(folder: str | os.PathLike) -> SplitFeatures:
    """Read a finished split folder written by :func:`extract_split`, checking that all its
    shards are present and were written with the same settings."""
    folder = Path(folder)
    paths = sorted(folder.glob("shard-*-of-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no feature shards in {folder}")
    first = _read_stamp(paths[0])
    if first is None or not isinstance(first.get("common"), dict):
        raise ValueError(f"{paths[0]} is not a readable feature shard")
    common = first["common"]
    count = math.ceil(common["images"] / common["shard_size"])
    paths = [folder / f"shard-{s:05d}-of-{count:05d}.safetensors" for s in range(count)]
    stamps = [
        {"common": common, "shard": s, "items_sha256": (_read_stamp(p) or {}).get("items_sha256")}
        for s, p in enumerate(paths)
    ]
    return _load_shards(paths, stamps, "skip")


def cached_class_features(
    encoder: ClipEncoder,
    class_names: Sequence[str],
    templates: Sequence[str],
    path: str | os.PathLike,
    *,
    context: Context = SINGLE,
    progress: bool = False,
) -> torch.Tensor:
    """The (C, D) class text features, cached in ``path`` and reused while model, class names
    and templates are unchanged. Rank 0 encodes; the others read its file."""
    path = Path(path)
    stamp = {
        "format": CACHE_FORMAT,
        **encoder.model_id,
        "class_names": list(class_names),
        "templates": list(templates),
    }
    if context.is_main and _read_stamp(path) != stamp:
        table = encoder.class_features(class_names, templates, progress=progress)
        metadata = {_STAMP_KEY: json.dumps(stamp, sort_keys=True)}
        save_safetensors(path, {"class_features": table}, metadata)
    context.barrier()
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("class_features")


def _feature_set(
    split: SplitFeatures, table: torch.Tensor, names: list[str], source: dict[str, Any]
) -> FeatureSet:
    common = split.stamp
    provenance = {
        "source": source,
        **{key: common.get(key) for key in ("split", "seed", "shots", "views")},
    }
    if common.get("augment"):
        provenance["augmentation"] = common["preprocessing"]["train"]
    return FeatureSet(
        features=split.features,
        labels=split.labels,
        class_features=table,
        class_names=names,
        provenance=provenance,
    )


def extract(
    encoder: ClipEncoder,
    dataset: Dataset,
    folder: str | os.PathLike,
    *,
    shots: int,
    seed: int,
    views: int = 10,
    crop_scale: tuple[float, float] = AUGMENT_SCALE,
    templates: Sequence[str] | None = None,
    shard_size: int = 1024,
    batch_size: int = 256,
    workers: int = 0,
    on_error: str = "skip",
    progress: bool = True,
    context: Context = SINGLE,
    test: bool = True,
) -> ExtractedFeatures:
    """Few-shot train (``views`` augmented rows per image, crops of ``crop_scale`` of the
    area), val (min(K, 4) per class) and the full test split of ``dataset``, encoded into the
    cache under ``folder``.

    The test split does not depend on ``seed`` or ``shots`` and is encoded once per folder
    (``test=False`` leaves it out: fitting a classifier needs train and val only).
    ``folder`` serves one source (encoder, checkpoint, preprocessing, dataset, templates): a
    folder holding another's features is refused (see :func:`fma_fast.io.features.claim_folder`).
    """
    folder = Path(folder)
    templates = list(templates or [dataset.template])
    source = extraction_source(encoder, dataset, templates)
    claim_folder(folder, source, "feature cache")
    train_items, val_items = few_shot(dataset, shots, seed)
    table = cached_class_features(encoder, dataset.class_names, templates,
                                  folder / "text.safetensors", context=context,
                                  progress=progress and context.is_main)
    options = dict(shard_size=shard_size, batch_size=batch_size, workers=workers,
                   on_error=on_error, progress=progress, context=context)
    splits = {
        "train": extract_split(encoder, dataset, train_items, "train",
                               folder / f"train-seed{seed}-k{shots}-v{views}", seed=seed,
                               shots=shots, views=views, crop_scale=crop_scale, **options),
        "val": extract_split(encoder, dataset, val_items, "val",
                             folder / f"val-seed{seed}-k{shots}", seed=seed, shots=shots,
                             **options),
    }
    if test:
        splits["test"] = extract_split(
            encoder, dataset, dataset.test, "test", folder / "test", **options
        )
    names = list(dataset.class_names)
    sets = {name: _feature_set(split, table, names, source) for name, split in splits.items()}
    return ExtractedFeatures(
        train=sets["train"],
        val=sets["val"],
        test=sets.get("test"),
        skipped={name: split.skipped for name, split in splits.items()},
    )
