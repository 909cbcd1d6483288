"""Lists of images to classify (``fma-fast predict``): a folder (recursive; labelled when every
image sits in a first-level folder named after a class), a text file of paths or a CSV with a
``path`` column and an optional ``label`` column of class names. Each input is one
:class:`ImageSource`, cut into parts by the batch job.

A part's input digest covers each image's path as listed, its label and the sha256 of its
file's bytes, read once: the job decodes the bytes it hashed, and a rerun hashes the files
again (no decoding) to tell which parts are still valid.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io.row_sources import InputError
from .datasets import IMAGE_SUFFIXES
from .transforms import Preprocess, open_image

LIST_SUFFIXES = {".txt", ".lst"}
CSV_SUFFIX = ".csv"
PATH_COLUMN, LABEL_COLUMN = "path", "label"


@dataclass(frozen=True)
class ImageEntry:
    """One image: ``shown`` (its path as the input lists it, written in the outputs), the
    ``file`` to read and its class index (None: unlabelled)."""

    shown: str
    file: Path
    label: int | None


@dataclass(frozen=True)
class ImageSource:
    """The images of one input (a folder, list or CSV ``path``) in their listed order."""

    path: Path
    kind: str
    entries: tuple[ImageEntry, ...]

    @property
    def rows(self) -> int:
        return len(self.entries)

    @property
    def labelled(self) -> bool:
        return bool(self.entries) and self.entries[0].label is not None

    def record(self) -> dict[str, Any]:
        """The input as records name it: resolved path, kind and how many images."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "images": self.rows}


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in sorted order (hidden ones skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def _folder(path: Path, classes: dict[str, int]) -> ImageSource:
    files = image_files(path)
    if not files:
        raise InputError(f"input folder {path} holds no image files "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    parents = [f.relative_to(path).parts for f in files]
    labelled = all(len(p) > 1 and p[0] in classes for p in parents)
    return ImageSource(path, "folder", tuple(
        ImageEntry(str(f), f, classes[p[0]] if labelled else None)
        for f, p in zip(files, parents)))


def _listed(base: Path, shown: str) -> Path:
    file = Path(shown)
    return file if file.is_absolute() else base / file


def _text_list(path: Path) -> ImageSource:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read image list {path}: {error}") from None
    entries = tuple(ImageEntry(line.strip(), _listed(path.parent, line.strip()), None)
                    for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return ImageSource(path, "list", entries)


def _csv_list(path: Path, classes: dict[str, int]) -> ImageSource:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read image CSV {path}: {error}") from None
    header = [cell.strip() for cell in rows[0]] if rows else []
    if PATH_COLUMN not in header:
        raise InputError(f"{path}: the first row must name the columns, with a "
                         f"{PATH_COLUMN!r} column (and optionally {LABEL_COLUMN!r}, class "
                         f"names); got {header}")
    where, label_at = header.index(PATH_COLUMN), (header.index(LABEL_COLUMN)
                                                  if LABEL_COLUMN in header else None)
    entries = []
    for number, row in enumerate(rows[1:], 2):
        if not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise InputError(f"{path}:{number}: {len(row)} cells for the {len(header)} "
                             f"columns {header}")
        label = None
        if label_at is not None:
            name = row[label_at].strip()
            if name not in classes:
                raise InputError(f"{path}:{number}: label {name!r} is not one of the "
                                 f"classifier's {len(classes)} classes")
            label = classes[name]
        shown = row[where].strip()
        entries.append(ImageEntry(shown, _listed(path.parent, shown), label))
    return ImageSource(path, "csv", tuple(entries))


def find_images(inputs: Sequence[str | os.PathLike], class_names: Sequence[str]
                ) -> list[ImageSource]:
    """One :class:`ImageSource` per input, labels by ``class_names``; an input given twice
    (by the same resolved path) is refused, as are empty ones."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise InputError("give at least one input (a folder of images, a .txt list or a .csv)")
    classes = {name: index for index, name in enumerate(class_names)}
    sources, seen = [], {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            source = _folder(path, classes)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            source = _text_list(path)
        elif path.suffix.lower() == CSV_SUFFIX and path.is_file():
            source = _csv_list(path, classes)
        elif not path.exists():
            raise InputError(f"input {path} does not exist")
        else:
            raise InputError(f"input {path}: expected a folder of images, a .txt list of image "
                             "paths or a .csv with a 'path' column")
        if not source.entries:
            raise InputError(f"input {path} lists no images")
        key = str(path.resolve())
        if key in seen:
            raise InputError(f"input {path} is given twice (as {seen[key]})")
        seen[key] = path
        sources.append(source)
    return sources


def read_image(file: Path) -> tuple[bytes | None, str]:
    """The bytes of an image file and their digest (``sha256:...``), or None and
    ``unreadable: <why>`` (what a part's digest records for a file that cannot be read)."""
    try:
        with open(file, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return None, f"unreadable: {error.strerror or type(error).__name__}"
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def entries_digest(entries: Sequence[ImageEntry], files: Sequence[str]) -> str:
    """A part's input digest: each image's listed path, label and file digest, in order."""
    digest = hashlib.sha256()
    for entry, file in zip(entries, files, strict=True):
        digest.update(json.dumps([entry.shown, entry.label, file]).encode() + b"\n")
    return digest.hexdigest()


def rehash(source: ImageSource, start: int, stop: int) -> str:
    """The digest :func:`entries_digest` gives rows ``start:stop`` now (files read, not
    decoded)."""
    entries = source.entries[start:stop]
    return entries_digest(entries, [read_image(entry.file)[1] for entry in entries])


@dataclass
class Decoded:
    """One image after decoding: its pixels (None when it could not be decoded and why), and
    its file digest."""

    pixels: torch.Tensor | None
    file_digest: str
    problem: str = ""


def decode(entry: ImageEntry, preprocess: Preprocess) -> Decoded:
    """Read the file once, decode the bytes read and preprocess them (resize, centre crop,
    normalise) as extraction does for test images."""
    data, digest = read_image(entry.file)
    if data is None:
        return Decoded(None, digest, digest.removeprefix("unreadable: "))
    buffer = io.BytesIO(data)
    try:
        return Decoded(preprocess.centre(open_image(buffer)), digest)
    except Exception as error:  # PIL raises many types for broken files
        why = str(error).replace(repr(buffer), "the file")  # no memory address in records
        return Decoded(None, digest, f"{type(error).__name__}: {why}")
