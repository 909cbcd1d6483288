"""Feature rows on disk, read a row range at a time: safetensors feature files, the extraction
cache's shards and ``.npy`` arrays, found from files or folders.

Rows are read with positioned reads into a fresh buffer, never through a memory map, so the
process holds only the rows it asked for: a map would keep every page it touched resident
(and counted) for as long as it is open. Internal module of :func:`fma_fast.score`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._io import file_problem

SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64}
SAFETENSORS_INTS = {"I64": torch.int64, "I32": torch.int32}
CACHE_STAMP_KEY = "fma_fast_cache"
"""The metadata key of the extraction cache's shard stamps (:mod:`fma_fast.clip.cache`)."""
_CACHE_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")


class InputError(ValueError):
    """An input that cannot be scored: missing, unreadable, of the wrong shape or kind."""


@dataclass(frozen=True)
class Column:
    """A 2-D (or 1-D) array inside a file: where its bytes start, its dtype and shape."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * _itemsize(self.dtype)


@dataclass(frozen=True)
class Shard:
    """One input file of rows: its features, and labels and row ids when the file has them
    (``per_image`` rows share one label / id, as the cache stores V views per image)."""

    path: Path
    features: Column
    labels: Column | None = None
    row_ids: Column | None = None
    per_image: int = 1
    class_table: Column | None = None

    @property
    def rows(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def identity(self) -> dict[str, int | str]:
        """What says the file is unchanged: its resolved path, size and modification time."""
        stat = self.path.stat()
        return {"path": str(self.path.resolve()), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}

    def read(self, start: int, stop: int, buffer: bytearray | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Rows ``start:stop``: features (fp32), labels (or None) and row ids (int64). With
        ``buffer`` (large enough) fp32 features are read into it and alias it."""
        with open(self.path, "rb") as handle:
            features = _read_rows(handle, self.features, start, stop, buffer).float()
            labels = self._per_row(handle, self.labels, start, stop)
            ids = self._per_row(handle, self.row_ids, start, stop)
        if ids is None:
            ids = torch.arange(start, stop, dtype=torch.int64)
        bad = ~torch.isfinite(features.sum(dim=1))  # NaN/Inf reach the row sums
        if bool(bad.any()):
            raise InputError(f"{self.path}: row {start + int(bad.nonzero()[0, 0])} contains NaN "
                             "or Inf")
        return features, labels, ids.long()

    def read_class_table(self) -> torch.Tensor | None:
        """The (C, D) class table a feature file carries, or None."""
        if self.class_table is None:
            return None
        with open(self.path, "rb") as handle:
            return _read_rows(handle, self.class_table, 0, self.class_table.shape[0]).float()

    def _per_row(self, handle, column: Column | None, start: int, stop: int):
        if column is None:
            return None
        first, last = start // self.per_image, -(-stop // self.per_image)
        values = _read_rows(handle, column, first, last).long()
        if self.per_image > 1:
            values = values.repeat_interleave(self.per_image)
            values = values[start - first * self.per_image: stop - first * self.per_image]
        return values


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _read_rows(handle, column: Column, start: int, stop: int,
               buffer: bytearray | None = None) -> torch.Tensor:
    count = stop - start
    size = count * column.row_bytes
    if not size:
        return torch.empty((0, *column.shape[1:]), dtype=column.dtype)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
    handle.seek(column.offset + start * column.row_bytes)
    if handle.readinto(memoryview(buffer)[:size]) != size:
        raise InputError(f"{handle.name}: the file is shorter than its header says (truncated?)")
    flat = torch.frombuffer(buffer, dtype=column.dtype, count=size // _itemsize(column.dtype))
    return flat.reshape(count, *column.shape[1:])


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise InputError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 2**20:
            raise InputError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file (unreadable header)")
    return header, 8 + length


def _column(path: Path, header: dict, start: int, name: str, kinds: dict) -> Column | None:
    entry = header.get(name)
    if entry is None:
        return None
    if entry.get("dtype") not in kinds:
        raise InputError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')}, expected one "
                         f"of {sorted(kinds)}")
    begin, end = entry["data_offsets"]
    column = Column(start + begin, kinds[entry["dtype"]], tuple(entry["shape"]))
    expected = column.shape[0] * column.row_bytes if column.shape else 0
    if end - begin != expected:
        raise InputError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                         f"{list(column.shape)}")
    return column


def safetensors_shard(path: Path) -> Shard:
    """A feature file (``features`` [+ ``labels``]) or an extraction cache shard (``features``,
    ``labels`` and ``image_index`` per image, V views per image)."""
    header, start = _safetensors_header(path)
    features = _column(path, header, start, "features", SAFETENSORS_FLOATS)
    if features is None:
        found = sorted(set(header) - {"__metadata__"})
        raise InputError(f"{path} has no 'features' tensor (found {found})")
    if len(features.shape) != 2:
        raise InputError(f"{path}: features must be 2-D (rows, dim), got {list(features.shape)}")
    labels = _column(path, header, start, "labels", SAFETENSORS_INTS)
    row_ids = _column(path, header, start, "image_index", SAFETENSORS_INTS)
    per_image = 1
    stamp = (header.get("__metadata__") or {}).get(CACHE_STAMP_KEY)
    if stamp is not None:
        try:
            per_image = int(json.loads(stamp)["common"]["views"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: unreadable extraction cache stamp") from None
    for name, column in (("labels", labels), ("image_index", row_ids)):
        if column is not None and column.shape[0] * per_image != features.shape[0]:
            raise InputError(f"{path}: {name} has {column.shape[0]} entries for "
                             f"{features.shape[0]} rows")
    table = _column(path, header, start, "class_features", SAFETENSORS_FLOATS)
    return Shard(path, features, labels, row_ids, per_image, table)


def npy_shard(path: Path) -> Shard:
    """A 2-D C-order float32/float16/float64 ``.npy`` array (no labels)."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
        except ValueError as error:
            raise InputError(f"{path} is not a .npy file ({error})") from None
        offset = handle.tell()
    if len(shape) != 2:
        raise InputError(f"{path}: the array must be 2-D (rows, dim), got shape {list(shape)}")
    if fortran:
        raise InputError(f"{path}: the array is Fortran-ordered; save it C-ordered")
    kinds = {np.dtype("<f4"): torch.float32, np.dtype("<f2"): torch.float16,
             np.dtype("<f8"): torch.float64}
    if dtype not in kinds:
        raise InputError(f"{path}: dtype {dtype} is not little-endian float16/32/64")
    return Shard(path, Column(offset, kinds[dtype], tuple(shape)))


def _shard(path: Path) -> Shard:
    problem = file_problem(path)
    if problem:
        raise InputError(f"cannot read input {path}: {problem}")
    if path.suffix in (".npy", ".safetensors"):
        shard = npy_shard(path) if path.suffix == ".npy" else safetensors_shard(path)
        if shard.rows == 0:
            raise InputError(f"input {path} has no rows")
        return shard
    raise InputError(f"input {path}: expected a .safetensors or .npy file, or a folder of them")


def _folder_shards(folder: Path) -> list[Shard]:
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".npy"))
    except OSError as error:
        raise InputError(f"cannot read input folder {folder}: {error.strerror}") from None
    if not files:
        raise InputError(f"input folder {folder} holds no .safetensors or .npy files")
    numbered = [_CACHE_SHARD.match(p.name) for p in files]
    if any(numbered):
        counts = {int(m[2]) for m in numbered if m}
        present = {int(m[1]) for m in numbered if m}
        if len(counts) != 1:
            raise InputError(f"{folder} mixes shards of differently split caches: of "
                             f"{sorted(counts)} shards")
        (count,) = counts
        missing = sorted(set(range(count)) - present)
        if missing:
            raise InputError(f"{folder}: shard {missing[0]} of {count} is missing "
                             f"(shard-{missing[0]:05d}-of-{count:05d}.safetensors)")
    return [_shard(p) for p in files]


def find_shards(inputs: list[str | os.PathLike]) -> list[Shard]:
    """The shards of every input, in order: a file is one shard, a folder its files."""
    if not inputs:
        raise InputError("give at least one input (a feature file, a folder of shards or a .npy)")
    shards: list[Shard] = []
    for given in inputs:
        path = Path(given)
        shards.extend(_folder_shards(path) if path.is_dir() else [_shard(path)])
    seen: dict[Path, Path] = {}
    for shard in shards:
        resolved = shard.path.resolve()
        if resolved in seen:
            raise InputError(f"input {shard.path} is given twice")
        seen[resolved] = shard.path
    return shards
