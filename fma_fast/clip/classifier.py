"""A fitted few-shot classifier as one object and one folder: images in, class names out.

:class:`FewShotClassifier` holds what inference needs: the encoder's spec (architecture,
weights digest and the tag or file they came from, preprocessing), the prompt templates, the
class names and their text table, the optional PEFT source, the velocity field, its step
size and the M chosen on val. :meth:`FewShotClassifier.fit` runs the ``run`` protocol for
one (shots, seed) draw (:mod:`fma_fast.clip.experiment`); :meth:`~FewShotClassifier.predict`
takes image files, folders, PIL images or preprocessed pixels.

The folder is an fma_fast model folder (``model.safetensors`` + ``config.json``, so ``eval``
and ``score`` read it as they read ``train``'s) plus ``classes.safetensors`` (the class table)
and ``classifier.json`` (the rest), written in that order, each atomically. ``classifier.json``
records the field's save id and the class table's digest, so pieces from different saves
never load together; the encoder rebuilt at load must have the recorded weights digest.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .._version import __version__
from ..batch.job import weights_sha256
from ..core.model import VelocityNet
from ..core.names import Amp, Backend, Precision, check_choice
from ..core.policy import DEFAULT_STEP_SIZE
from ..core.validation import resolve_device
from ..io import checkpoint
from ..io.checkpoint import CheckpointError
from ..io.features import FeatureSet, class_table_sha256, data_record
from ..io.files import file_problem, loads_json, read_json_record, save_safetensors, write_text
from ..solver.api import SolveResult
from ..solver.api import solve as solve_rows
from ..train.fit import fit as fit_field
from .cache import ON_ERROR, extract
from .datasets import IMAGE_SUFFIXES, Dataset, Item, load_dataset
from .encoder import HF_HUB_PREFIX, RANDOM_INIT, ClipEncoder, import_open_clip, load_encoder
from .experiment import Job, SolveSettings, fit_job, prepare_job
from .images import image_files
from .peft import PeftEncoder, load_peft, peft_default_templates
from .prompts import DEFAULT_TEMPLATE, resolve_templates
from .transforms import AUGMENT_SCALE, Preprocess, open_image, require_image_libraries

CLASSIFIER_NAME = "classifier.json"
CLASSES_NAME = "classes.safetensors"
CLASSIFIER_FORMAT = "fma_fast/classifier/1"
_CLASSES_STAMP = "fma_fast_classifier"
ENCODE_BATCH = 256
"""Images per encoder call in :meth:`FewShotClassifier.predict`: ``extract``'s default, so
the same images give the same features either way."""


class ClassifierError(CheckpointError):
    """A classifier folder that is incomplete, mixed from different saves, or whose encoder
    cannot be rebuilt as it was fitted."""


@dataclass
class Predictions:
    """What :meth:`FewShotClassifier.predict` found: per image (row) the top-k class
    ``indices`` (N, k) and their ``cosines`` (N, k), best first; ``paths`` (the file of each
    row, None for PIL images and tensors); ``skipped``, the unreadable files left out; ``path``,
    the solver implementation that ran."""

    indices: torch.Tensor
    cosines: torch.Tensor
    class_names: list[str]
    paths: list[str | None]
    skipped: list[str] = field(default_factory=list)
    path: str = ""

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def pred(self) -> torch.Tensor:
        """The top-1 class index of every row (N,)."""
        return self.indices[:, 0]

    @property
    def names(self) -> list[list[str]]:
        """The top-k class names of every row."""
        return [[self.class_names[c] for c in row] for row in self.indices.tolist()]

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict per row: path, top-k indices, names and cosines (for CSV or JSON lines)."""
        for path, indices, cosines in zip(self.paths, self.indices.tolist(),
                                          self.cosines.tolist()):
            yield {"path": path, "indices": indices,
                   "names": [self.class_names[c] for c in indices], "cosines": cosines}


def _unit_table(name: str, table: torch.Tensor) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or not table.is_floating_point():
        raise TypeError(f"{name} must be a (C, D) float tensor")
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return table.detach().to("cpu", torch.float32).contiguous()


def _base_encoder(encoder) -> ClipEncoder:
    return encoder.source.encoder if isinstance(encoder, PeftEncoder) else encoder


def _encoder_spec(encoder) -> dict[str, Any]:
    spec = _base_encoder(encoder).spec
    spec["precision"] = encoder.precision
    return spec


def _peft_spec(encoder) -> dict[str, Any] | None:
    if not isinstance(encoder, PeftEncoder):
        return None
    return {**encoder.source.describe(), "checkpoint_file": str(encoder.source.path.resolve())}


def _identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What must match for an encoder to give a classifier's features: the architecture's name,
    the weights' digest and the preprocessing (not where the weights came from, nor the
    autocast)."""
    return {key: spec.get(key) for key in ("model", "checkpoint", "preprocessing")}


def _inputs(images) -> list[tuple[str | None, Any]]:
    """(path or None, an image path, PIL image or (3, H, W) pixel tensor) per image."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
            return [(str(p), p) for p in found]
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        return [(str(path), path)]
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [(None, images)]
        if images.ndim == 4:
            return [(None, pixels) for pixels in images]
        raise ValueError(
            f"a tensor of images must be preprocessed pixels (B, 3, H, W) or (3, H, W), got "
            f"shape {list(images.shape)}; use predict_features for (N, D) features"
        )
    if _is_pil(images):
        return [(None, images)]
    if isinstance(images, (list, tuple)):
        return [entry for item in images for entry in _inputs(item)]
    raise TypeError(
        "images must be a path (file or folder), a PIL image, a pixel tensor or a list of "
        f"those, got {type(images).__name__}"
    )


def _is_pil(value) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(value, Image.Image)


class FewShotClassifier:
    """Images to class names through a CLIP encoder, its class text table and a fitted FMA
    velocity field solved for ``steps`` Euler steps of ``step_size``.

    Build one with :meth:`fit` (or from an ``fma-fast run`` folder with :meth:`load`); the
    constructor takes the pieces as they are. ``record`` is JSON-able provenance (what was
    fitted on what) kept in ``classifier.json``.
    """

    def __init__(
        self,
        *,
        encoder,
        field: VelocityNet,
        class_features: torch.Tensor,
        class_names: Sequence[str],
        templates: Sequence[str],
        steps: int,
        step_size: float = DEFAULT_STEP_SIZE,
        precision: Precision = "fp32",
        backend: Backend = "auto",
        source: dict[str, Any] | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(field, VelocityNet):
            raise TypeError(f"field must be a VelocityNet, got {type(field).__name__}")
        table = _unit_table("class_features", class_features)
        names = [str(name) for name in class_names]
        if len(names) != table.shape[0]:
            raise ValueError(f"class_names has {len(names)} names for {table.shape[0]} classes")
        if table.shape[1] != field.dim:
            raise ValueError(
                f"class_features are {table.shape[1]}-dimensional, the field {field.dim}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        self.encoder = encoder
        self.field = field.eval()
        self.class_features = table
        self.class_names = names
        self.templates = list(templates)
        self.steps = steps
        self.step_size = float(step_size)
        self.precision = precision
        self.backend = backend
        self.source = source
        self.record = dict(record or {})

    # ------------------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        data,
        *,
        encoder,
        labels: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        root: str | os.PathLike | None = None,
        shots: int = 16,
        seed: int = 1,
        views: int = 10,
        templates: Sequence[str] | str | None = None,
        crop_scale: tuple[float, float] = AUGMENT_SCALE,
        cache: str | os.PathLike | None = None,
        max_steps: int = 10,
        step_size: float = DEFAULT_STEP_SIZE,
        precision: Precision = "fp32",
        backend: Backend = "auto",
        device: str | torch.device | None = None,
        encode_batch_size: int = ENCODE_BATCH,
        workers: int = 0,
        on_error: str = "skip",
        progress: bool = False,
        **fit_options: Any,
    ) -> FewShotClassifier:
        """Fit on one K-shot draw of ``data`` as ``fma-fast run`` does: ``shots`` images per
        class and ``views`` augmented crops of each (seeded by ``seed``) train the field,
        min(K, 4) val images per class choose M.

        ``data`` is a :class:`~fma_fast.clip.Dataset`, a dataset name or path (as
        :func:`~fma_fast.clip.load_dataset` takes, under ``root``), or image paths with
        ``labels`` (class indices) and ``class_names``: val is then drawn from the images
        not drawn for training. ``encoder`` is a :class:`~fma_fast.clip.ClipEncoder` or a
        :class:`~fma_fast.clip.PeftEncoder`. ``templates``: the dataset's (or the PEFT
        method's) by default. ``cache``: a feature cache folder to keep (None: a temporary
        one). ``fit_options`` go to :func:`fma_fast.fit` (blocks, epochs, lr, gamma, ...).
        """
        device = resolve_device(device)
        dataset = _as_dataset(data, labels, class_names, root)
        method = getattr(getattr(encoder, "source", None), "method", None)
        templates = resolve_templates(templates or peft_default_templates(method), dataset.name)
        settings = SolveSettings(max_steps, step_size, precision, backend)
        with contextlib.ExitStack() as stack:
            folder = cache if cache is not None else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fma-fast-fit-"))
            features = extract(
                encoder, dataset, folder, shots=shots, seed=seed, views=views,
                crop_scale=crop_scale, templates=templates, batch_size=encode_batch_size,
                workers=workers, on_error=on_error, progress=progress, test=False,
            )
        job = Job(shots, seed)
        prepare_job(job, features, "all")

        def train(split: FeatureSet, table, *, seed: int, device: str):
            return fit_field(split.features, split.labels, table, seed=seed, device=device,
                             views=views, progress=progress, **fit_options)

        fitted = fit_job(job, train, settings, device, encoder)
        record = {"shots": shots, "seed": seed, "views": views, "crop_scale": list(crop_scale),
                  "dataset": dataset.name, "skipped_images": features.skipped}
        return cls.from_fitted(encoder, templates, features.train, fitted, settings, record)

    @classmethod
    def from_fitted(
        cls,
        encoder,
        templates: Sequence[str],
        classes: FeatureSet,
        fitted: dict[str, Any],
        solve: SolveSettings,
        record: dict[str, Any] | None = None,
    ) -> FewShotClassifier:
        """A classifier from one fitted job of the run protocol (:func:`fit_job`): its field
        and M, scored against the class table and names of ``classes`` (all classes)."""
        selection = fitted["selection"]
        return cls(
            encoder=encoder,
            field=fitted["model"],
            class_features=classes.class_features,
            class_names=classes.class_names or [str(c) for c in range(len(classes.class_features))],
            templates=templates,
            steps=selection.best_steps,
            step_size=solve.step_size,
            precision=solve.precision,
            backend=solve.backend,
            source=classes.source,
            record={
                **(record or {}),
                "training": fitted["config"],
                "fit_seconds": round(fitted["seconds"], 3),
                "val_rows": fitted["val_rows"],
                "val_accuracy": selection.accuracy,
                "val_cross_entropy": selection.cross_entropy,
            },
        )

    # --------------------------------------------------------------------------- predicting

    @property
    def preprocess(self) -> Preprocess:
        """The encoder's resize, centre crop and normalisation (what extraction uses on test)."""
        return Preprocess.from_encoder(self.encoder)

    def _tables(self):
        if getattr(self.encoder, "per_image", False):
            return self.encoder.per_image_tables()
        return self.class_features

    def encode(
        self, images, *, batch_size: int = ENCODE_BATCH, on_error: str = "fail"
    ) -> tuple[torch.Tensor, list[str | None], list[str]]:
        """Unit-norm image features (N, D) of ``images`` (as :meth:`predict` takes them), the
        path of each row (None for PIL images and tensors) and the files skipped as unreadable
        (``on_error="skip"``; ``"fail"`` raises naming the file)."""
        check_choice("on_error", on_error, ON_ERROR)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        entries = _inputs(images)
        if not entries:
            raise ValueError("no images given")
        preprocess = self.preprocess
        size = (3, *preprocess.size)
        if any(not isinstance(value, torch.Tensor) for _, value in entries):
            require_image_libraries()
        chunks, paths, skipped = [], [], []
        for start in range(0, len(entries), batch_size):
            pixels = []
            for path, value in entries[start:start + batch_size]:
                if isinstance(value, torch.Tensor):
                    if tuple(value.shape) != size:
                        raise ValueError(
                            f"pixel tensors must be preprocessed to {list(size)} (this "
                            f"encoder's input), got {list(value.shape)}; pass PIL images or "
                            "paths to have them preprocessed"
                        )
                    pixels.append(value.float())
                else:
                    try:
                        image = open_image(value) if path is not None else value.convert("RGB")
                    except Exception as error:  # PIL raises many types for broken files
                        if on_error == "fail":
                            raise ValueError(
                                f"cannot read image {path} ({type(error).__name__}: {error}); "
                                "pass on_error='skip' to skip unreadable images"
                            ) from None
                        skipped.append(path)
                        continue
                    pixels.append(preprocess.centre(image))
                paths.append(path)
            if pixels:
                chunks.append(self.encoder.encode_images(torch.stack(pixels)))
        if not chunks:
            raise ValueError(f"none of the {len(entries)} images could be read")
        return torch.cat(chunks), paths, skipped

    def solve(self, features, *, topk: int = 1, zero_shot: bool = False, device=None,
              precision=None, backend=None) -> SolveResult:
        """The solver's result for unit-norm image features (N, D) of this classifier's
        encoder against its classes (``zero_shot``: the M=0 prediction too)."""
        return solve_rows(
            features, self.field, self.steps, step_size=self.step_size,
            class_features=self._tables(), topk=topk, device=device, zero_shot=zero_shot,
            precision=precision or self.precision, backend=backend or self.backend,
        )

    def identity(self) -> dict[str, Any]:
        """What its predictions depend on: the field's weights, M and h, the class table and
        names, the encoder (architecture, weights digest, preprocessing, autocast) and the PEFT
        file's digest. A batch job's folder is tied to it."""
        peft = _peft_spec(self.encoder)
        return {
            "field_sha256": weights_sha256(self.field),
            "steps": self.steps,
            "step_size": self.step_size,
            "class_table_sha256": class_table_sha256(self.class_features),
            "class_names": self.class_names,
            "encoder": {**_identity(_encoder_spec(self.encoder)),
                        "precision": self.encoder.precision},
            "peft": None if peft is None else {key: peft.get(key) for key in
                                               ("method", "checkpoint_sha256")},
        }

    def predict_features(self, features, *, topk: int = 1, device=None, precision=None,
                         backend=None) -> Predictions:
        """Solve unit-norm image features (N, D) of this classifier's encoder and score them
        against its classes (paths are None)."""
        result = self.solve(features, topk=topk, device=device, precision=precision,
                            backend=backend)
        return Predictions(result.topk_indices, result.topk_values, self.class_names,
                           [None] * int(result.pred.shape[0]), path=result.path)

    def predict(self, images, *, topk: int = 1, batch_size: int = ENCODE_BATCH,
                on_error: str = "fail", device=None, precision=None,
                backend=None) -> Predictions:
        """Top-``topk`` classes of ``images``: an image file, a folder (its image files,
        recursively, sorted), a PIL image, preprocessed pixels (B, 3, H, W) or (3, H, W), or a
        list of these. Unreadable files raise, or with ``on_error="skip"`` are listed in
        ``.skipped``. ``precision``/``backend``: the solver's (None: as fitted)."""
        features, paths, skipped = self.encode(images, batch_size=batch_size, on_error=on_error)
        found = self.predict_features(features, topk=topk, device=device, precision=precision,
                                      backend=backend)
        found.paths, found.skipped = paths, skipped
        return found

    # ------------------------------------------------------------------------ saving, loading

    def _description(self) -> dict[str, Any]:
        return {
            "format": CLASSIFIER_FORMAT,
            "fma_fast_version": __version__,
            "encoder": _encoder_spec(self.encoder),
            "peft": _peft_spec(self.encoder),
            "templates": self.templates,
            "class_names": self.class_names,
            "steps": self.steps,
            "step_size": self.step_size,
            "solve": {"precision": self.precision, "backend": self.backend},
            "source": self.source,
            "fit": self.record,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the classifier to ``folder`` (created when missing): the field as an fma_fast
        model folder, ``classes.safetensors`` and, last, ``classifier.json`` tying them
        together. Files there must be an earlier classifier's; others are never overwritten."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"classifier folder {folder} is a file")
        check_classifier_folder(folder)
        try:  # checked before anything is written
            description = json.loads(json.dumps(self._description(), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise TypeError(f"the classifier's record must be JSON (no NaN/Inf): {error}") from None
        table_sha = class_table_sha256(self.class_features)
        stamp = json.dumps({"format": CLASSIFIER_FORMAT, "class_table_sha256": table_sha},
                           sort_keys=True)
        save_safetensors(folder / CLASSES_NAME, {"class_features": self.class_features},
                         {_CLASSES_STAMP: stamp, "class_names": json.dumps(self.class_names)})
        classes = FeatureSet(features=self.class_features[:0], labels=None,
                             class_features=self.class_features, class_names=self.class_names,
                             provenance=None if self.source is None else {"source": self.source})
        extra = {"steps": self.steps, "step_size": self.step_size, "data": data_record(classes),
                 "normalize": True}
        if "val_accuracy" in self.record:
            extra["val_accuracy"] = self.record["val_accuracy"]
        if "training" in self.record:
            extra["training"] = self.record["training"]
        checkpoint.save(self.field, folder, extra=extra)
        description.update(field_save_id=checkpoint.load_config(folder)["save_id"],
                           class_table_sha256=table_sha)
        write_text(folder / CLASSIFIER_NAME,
                   json.dumps(description, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        encoder=None,
        checkpoint_file: str | os.PathLike | None = None,
        peft_checkpoint: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        precision: Amp = "auto",
    ) -> FewShotClassifier:
        """Read a folder written by :meth:`save` (or by ``fma-fast run``) and rebuild its
        encoder: from the recorded pretrained tag (open_clip's cache, ``cache_dir``), the
        recorded weights file (or ``checkpoint_file`` when it has moved), or the random-init
        seed, and its PEFT source (``peft_checkpoint`` when moved); or pass ``encoder``. The
        weights' digest, preprocessing and PEFT file must be those it was fitted with, and the
        folder's pieces must come from one save; anything else raises :class:`ClassifierError`.
        """
        folder = Path(folder)
        description = read_classifier(folder)
        config = checkpoint.load_config(folder)
        recorded_id = description.get("field_save_id")
        if recorded_id != config.get("save_id"):
            raise ClassifierError(
                f"{folder / CLASSIFIER_NAME} belongs to field save {recorded_id}, but "
                f"{folder / checkpoint.CONFIG_NAME} is save {config.get('save_id')}: the "
                "folder mixes two saves (interrupted or copied over); save the classifier again"
            )
        field_net = checkpoint.load(folder)
        table = _read_classes(folder)
        digest = class_table_sha256(table)
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        for where, recorded in ((CLASSIFIER_NAME, description.get("class_table_sha256")),
                                (checkpoint.CONFIG_NAME, data.get("class_table_sha256"))):
            if recorded != digest:
                raise ClassifierError(
                    f"{folder / CLASSES_NAME} holds another class table than {where} records "
                    f"(sha256 {digest[:12]} vs {str(recorded)[:12]}): the folder mixes two "
                    "saves; save the classifier again"
                )
        names = description.get("class_names")
        if names != data.get("class_names") or config.get("steps") != description.get("steps"):
            raise ClassifierError(
                f"{folder}: {CLASSIFIER_NAME} and {checkpoint.CONFIG_NAME} disagree on the class "
                "names or M: the folder mixes two saves; save the classifier again"
            )
        spec = description["encoder"]
        if encoder is None:
            encoder = _rebuild_encoder(spec, checkpoint_file, cache_dir, device, precision)
        _check_encoder(folder, spec, _base_encoder(encoder).spec)
        encoder = _with_peft(folder, encoder, description.get("peft"), names, peft_checkpoint)
        target = _base_encoder(encoder).device
        solve = description.get("solve") or {}
        return cls(
            encoder=encoder,
            field=field_net.to(target),
            class_features=table,
            class_names=names,
            templates=description.get("templates") or [DEFAULT_TEMPLATE],
            steps=description["steps"],
            step_size=description["step_size"],
            precision=solve.get("precision", "fp32"),
            backend=solve.get("backend", "auto"),
            source=description.get("source"),
            record=description.get("fit"),
        )


# ------------------------------------------------------------------------------- helpers


def _as_dataset(data, labels, class_names, root) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if labels is None:
        if class_names is not None:
            raise ValueError("class_names goes with a list of images and their labels")
        if not isinstance(data, (str, os.PathLike)):
            raise TypeError(
                "data must be a Dataset, a dataset name or path, or image paths with labels="
            )
        return load_dataset(data, root)
    if isinstance(data, (str, os.PathLike)) or not isinstance(data, Sequence):
        raise TypeError("with labels=, data must be a list of image paths")
    if class_names is None:
        raise ValueError("image paths with labels need class_names (the prompts use them)")
    if len(labels) != len(data):
        raise ValueError(f"{len(data)} images but {len(labels)} labels")
    names = [str(name) for name in class_names]
    items = []
    for path, label in zip(data, labels):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            raise ValueError(f"labels must be ints in [0, {len(names)}), got {label!r}")
        items.append(Item(str(Path(path).resolve()), label))
    return Dataset("images", Path("/"), names, DEFAULT_TEMPLATE, items, None, [])


def check_classifier_folder(folder: Path) -> None:
    """A folder :meth:`FewShotClassifier.save` may write into: what it would replace must be an
    earlier classifier's (or model's) files."""
    checkpoint.check_model_folder(folder, "classifier folder")
    record = folder / CLASSIFIER_NAME
    if record.exists() and (read_json_record(record) or {}).get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"classifier folder {folder}: {CLASSIFIER_NAME} there is not an fma_fast "
                         "classifier's; refusing to overwrite it (choose another folder)")
    classes = folder / CLASSES_NAME
    if classes.exists() and _classes_stamp(classes) is None:
        raise ValueError(f"classifier folder {folder}: {CLASSES_NAME} there is not an fma_fast "
                         "classifier's; refusing to overwrite it (choose another folder)")


def _classes_stamp(path: Path) -> dict | None:
    if file_problem(path):  # a FIFO in its place would block the open
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            stamp = loads_json((handle.metadata() or {})[_CLASSES_STAMP], f"{path}'s stamp")
    except (SafetensorError, OSError, ValueError, KeyError):  # JsonError is a ValueError
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == CLASSIFIER_FORMAT else None


def read_classifier(folder: Path) -> dict[str, Any]:
    """The checked ``classifier.json`` of a classifier folder."""
    if folder.exists() and not folder.is_dir():
        raise ClassifierError(f"{folder} is a file; a classifier is a folder")
    path = folder / CLASSIFIER_NAME
    if not path.is_file():
        raise ClassifierError(
            f"{path} is missing: {folder} is not a classifier folder written by "
            "FewShotClassifier.save or fma-fast run (or its save was interrupted)"
        )
    found = read_json_record(path)
    if found is None or found.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierError(f"{path} is not a readable {CLASSIFIER_FORMAT} record")
    for key in ("encoder", "class_names", "steps", "step_size", "field_save_id",
                "class_table_sha256"):
        if key not in found:
            raise ClassifierError(f"{path} lacks {key!r}")
    return found


def _read_classes(folder: Path) -> torch.Tensor:
    path = folder / CLASSES_NAME
    if _classes_stamp(path) is None:
        raise ClassifierError(f"{path} is missing or not a classifier's class table")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor("class_features")
    except (SafetensorError, OSError, ValueError) as error:
        raise ClassifierError(f"{path} is not a readable class table: {error}") from None


def _register_architecture(name: str, architecture: dict[str, Any] | None) -> None:
    """Make open_clip know ``name`` as it was when the classifier was fitted: register the
    recorded architecture when it is unknown here, refuse when it differs."""
    if name.startswith(HF_HUB_PREFIX) or architecture is None:
        return
    open_clip = import_open_clip()
    known = open_clip.get_model_config(name)
    if known is None:
        with tempfile.TemporaryDirectory(prefix="fma-fast-arch-") as folder:
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(architecture))
            open_clip.add_model_config(path)
    elif json.loads(json.dumps(known)) != json.loads(json.dumps(architecture)):
        raise ClassifierError(
            f"open_clip's architecture {name!r} here differs from the one the classifier was "
            "fitted with (another open_clip version or a re-registered config)"
        )


def _rebuild_encoder(spec, checkpoint_file, cache_dir, device, precision):
    name, provenance = spec["model"], spec.get("checkpoint", "")
    _register_architecture(name, spec.get("architecture"))
    options = {"device": device, "precision": precision}
    if provenance.startswith(RANDOM_INIT):
        return load_encoder(name, init_seed=int(provenance[len(RANDOM_INIT):]), **options)
    if spec.get("pretrained") and checkpoint_file is None:
        return load_encoder(name, pretrained=spec["pretrained"], cache_dir=cache_dir, **options)
    if name.startswith(HF_HUB_PREFIX) and checkpoint_file is None:
        return load_encoder(name, cache_dir=cache_dir, **options)
    weights = checkpoint_file if checkpoint_file is not None else spec.get("weights_file")
    if weights is None or not Path(weights).is_file():
        raise ClassifierError(
            f"the classifier's encoder weights ({provenance}) were in {weights}, which is not "
            "there now; pass checkpoint_file= (the same file) or encoder="
        )
    return load_encoder(name, weights, **options)


def _check_encoder(folder: Path, recorded: dict[str, Any], found: dict[str, Any]) -> None:
    expected, actual = _identity(recorded), _identity(found)
    differing = [key for key in expected if expected[key] != actual[key]]
    if differing:
        key = differing[0]
        raise ClassifierError(
            f"{folder} was fitted with encoder {key} {expected[key]!r}, this encoder has "
            f"{actual[key]!r}: its features would not be the classifier's"
        )


def _with_peft(folder: Path, encoder, peft: dict[str, Any] | None, names, peft_checkpoint):
    """The encoder seen through the classifier's PEFT source (checked to be the same file)."""
    if peft is None:
        if isinstance(encoder, PeftEncoder):
            raise ClassifierError(f"{folder} was fitted without a PEFT source; pass the plain "
                                  "encoder")
        return encoder
    if isinstance(encoder, PeftEncoder):
        source = encoder.source
    else:
        path = peft_checkpoint if peft_checkpoint is not None else peft.get("checkpoint_file")
        if path is None or not Path(path).is_file():
            raise ClassifierError(
                f"the classifier's {peft['method']} checkpoint (sha256 "
                f"{peft['checkpoint_sha256'][:12]}) was {path}, which is not there now; pass "
                "peft_checkpoint= (the same file)"
            )
        source = load_peft(peft["method"], path, encoder, names,
                           class_token_position=peft.get("class_token_position", "end"),
                           strict_classes=False)
    if source.method != peft["method"] or source.checkpoint_sha256 != peft["checkpoint_sha256"]:
        raise ClassifierError(
            f"{folder} was fitted with {peft['method']} checkpoint sha256 "
            f"{peft['checkpoint_sha256'][:12]}, got {source.method} "
            f"{source.checkpoint_sha256[:12]}"
        )
    return encoder if isinstance(encoder, PeftEncoder) else PeftEncoder(source)
