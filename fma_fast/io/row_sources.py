"""Feature rows on disk, read a row range at a time: safetensors feature files, the extraction
cache's shards and ``.npy`` arrays, found from files or folders.

Rows are read with positioned reads into a fresh buffer, never through a memory map, so the
process holds only the rows it asked for: a map would keep every page it touched resident
(and counted) for as long as it is open. Every header is checked against the file's size when
the inputs are found, and a :class:`ShardReader` reads one shard through one open handle,
checked to be the very file that was planned (device, inode, size, times), with a digest of
the bytes it read. Internal module of :func:`fma_fast.score`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core.policy import SCORE_LABEL_ROWS
from ..core.validation import LABEL_DTYPES
from .features import PROVENANCE_KEY, FeatureFileError, recorded_source
from .files import SAFETENSORS_DTYPES, JsonError, file_problem, loads_json

SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64}
SAFETENSORS_INTS = {"I64": torch.int64, "I32": torch.int32}
SAFETENSORS_LABELS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()
                      if dtype in LABEL_DTYPES}
"""Labels in a file: the dtypes :func:`~fma_fast.core.validation.check_labels` accepts."""
CACHE_STAMP_KEY = "fma_fast_cache"
"""The metadata key of the extraction cache's shard stamps (:mod:`fma_fast.clip.cache`)."""
_CACHE_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")


class InputError(ValueError):
    """An input that cannot be scored: missing, unreadable, of the wrong shape or kind."""


class InputChanged(InputError):
    """An input file that changed (rewritten, replaced) while or since the job read it."""


@dataclass(frozen=True)
class FileIdentity:
    """What tells one file version from another without reading it: device, inode, size and
    the modification and change times (no program sets the change time: ``touch -r`` and
    ``cp -p`` set the modification time only). A change of the change time alone is also
    what chmod, a new hard link or setting the access time do: then what was read is read
    again (:meth:`ShardReader.check_unchanged`)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, found: os.stat_result) -> FileIdentity:
        return cls(found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns,
                   found.st_ctime_ns)


@dataclass(frozen=True)
class Column:
    """A 2-D (or 1-D) array inside a file: where its bytes start, its dtype and shape."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * _itemsize(self.dtype)

    def describe(self) -> list:
        """How a row's bytes are read (dtype, row shape); not where, nor how many rows."""
        return [str(self.dtype), list(self.shape[1:])]


@dataclass
class ReadSoFar:
    """What this process relies on of a shard's file: the identity it accepts (the planned
    one, or a later one whose change time alone differed and whose bytes read were the same
    when read again), and the digest of each row range read."""

    identity: FileIdentity
    ranges: dict[tuple[int, int], str] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """One input file of rows: its features, and labels and row ids when the file has them
    (``per_image`` rows share one label / id, as the cache stores V views per image), the
    file's identity when its header was read, an extraction cache shard's stamp, and the
    ``source`` of its features when known (a feature file's provenance, the source.json of
    the cache a shard belongs to)."""

    path: Path
    features: Column
    identity: FileIdentity
    labels: Column | None = None
    row_ids: Column | None = None
    per_image: int = 1
    class_table: Column | None = None
    stamp: dict | None = None
    source: dict | None = None
    read_so_far: ReadSoFar = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "read_so_far", ReadSoFar(self.identity))

    @property
    def rows(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def record(self) -> dict[str, int | str]:
        """The file as a part's record names it: resolved path, size and modification time."""
        return {"path": str(self.path.resolve()), "size": self.identity.size,
                "mtime_ns": self.identity.mtime_ns}

    def layout(self) -> str:
        """How the bytes a part reads are read (part of every part's digest): the same rows
        read the same way give the same outputs, wherever the file holds them."""
        columns = [None if c is None else c.describe()
                   for c in (self.features, self.labels, self.row_ids)]
        return json.dumps([columns, self.per_image])

    def open(self) -> ShardReader:
        return ShardReader(self)

    def label_range(self) -> tuple[int, int] | None:
        """The smallest and largest label, or None without labels (read once, up front,
        :data:`~fma_fast.core.policy.SCORE_LABEL_ROWS` at a time)."""
        if self.labels is None or not self.labels.shape[0]:
            return None
        labels = self.labels

        def scan(reader: ShardReader) -> tuple[int, int]:
            low, high = None, None
            buffer = bytearray(min(SCORE_LABEL_ROWS, labels.shape[0]) * labels.row_bytes)
            for start in range(0, labels.shape[0], SCORE_LABEL_ROWS):
                stop = min(start + SCORE_LABEL_ROWS, labels.shape[0])
                values = _read_rows(reader.handle, labels, start, stop, buffer)
                low = int(values.min()) if low is None else min(low, int(values.min()))
                high = int(values.max()) if high is None else max(high, int(values.max()))
            return low, high

        with self.open() as reader:
            found = scan(reader)
            reader.check_unchanged(verify=lambda: scan(reader) == found)
        return found

    def read_class_table(self) -> torch.Tensor | None:
        """The (C, D) class table a feature file carries, or None."""
        if self.class_table is None:
            return None
        rows = self.class_table.shape[0]
        with self.open() as reader:
            table = _read_rows(reader.handle, self.class_table, 0, rows)
            reader.check_unchanged(verify=lambda: torch.equal(
                _read_rows(reader.handle, self.class_table, 0, rows), table))
        return table.float()


class PartDigest:
    """sha256 of the rows a part read, fed as they are read: features as stored, labels and
    row ids per row, and the header's layout; the same however the rows were chunked."""

    def __init__(self, shard: Shard):
        self.layout = shard.layout()
        self.columns = [hashlib.sha256() for _ in range(3)]

    def update(self, column: int, data) -> None:
        self.columns[column].update(data)

    def hexdigest(self) -> str:
        digest = hashlib.sha256(self.layout.encode())
        for column in self.columns:
            digest.update(column.digest())
        return digest.hexdigest()


REHASH_BYTES = 16 * 2**20
"""Bytes read at a time when rows are hashed again after a change of the change time."""


class ShardReader:
    """One shard read through one open handle, which must be the file its header was read from
    (:meth:`check_unchanged` compares again after reading)."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.handle = _open_regular(shard.path)
        try:
            self._check(FileIdentity.of(os.fstat(self.handle.fileno())), "since the job read "
                                                                         "its header")
        except BaseException:
            self.handle.close()
            raise

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.handle.close()

    def _check(self, found: FileIdentity, when: str,
               verify: Callable[[], bool] | None = None) -> None:
        accepted = self.shard.read_so_far.identity
        if found == accepted:
            return
        what = [name for name in ("device", "inode", "size", "mtime_ns", "ctime_ns")
                if getattr(found, name) != getattr(accepted, name)]
        if what == ["ctime_ns"] and self._read_alike(found) and (verify is None or verify()):
            self.shard.read_so_far.identity = found
            return
        raise InputChanged(f"input {self.shard.path} changed {when} ({', '.join(what)} "
                           "differ): its rows were not recorded as scored; run the job "
                           "again once the file no longer changes")

    def _read_alike(self, found: FileIdentity) -> bool:
        """After a change of the change time alone (chmod, a new hard link, setting the
        access time; or a rewrite with the modification time set back), whether what was
        read is still what the file holds: its header, and every row range read (hashed
        again against its digest)."""
        read = npy_shard if self.shard.path.suffix == ".npy" else safetensors_shard
        try:
            self.handle.seek(0)
            again = read(self.shard.path, self.handle, found)
        except InputError:
            return False
        if replace(again, identity=self.shard.identity) != self.shard:
            return False
        return all(self.rows_digest(start, stop) == digest
                   for (start, stop), digest in self.shard.read_so_far.ranges.items())

    def rows_digest(self, start: int, stop: int) -> str:
        """The digest of rows ``start:stop`` as the file holds them now (:class:`PartDigest`),
        read :data:`REHASH_BYTES` at a time."""
        digest = PartDigest(self.shard)
        step = max(1, REHASH_BYTES // self.shard.features.row_bytes)
        for first in range(start, stop, step):
            self.read(first, min(first + step, stop), None, digest)
        return digest.hexdigest()

    def check_unchanged(self, rows: tuple[int, int, PartDigest] | None = None,
                        verify: Callable[[], bool] | None = None) -> None:
        """Refuse a file written since it was planned (through this handle's inode) or
        replaced (the path now names another file). ``rows``: the range just read and its
        digest, kept so that it can be hashed again. Where only the change time differs,
        everything read is read again (``rows``, what :meth:`ShardReader.read` read before,
        and ``verify()``) and the file is refused only if it differs."""
        if rows is not None:
            start, stop, digest = rows
            also = verify

            def verify() -> bool:
                return self.rows_digest(start, stop) == digest.hexdigest() and \
                    (also is None or also())

        self._check(FileIdentity.of(os.fstat(self.handle.fileno())), "while it was read",
                    verify)
        try:
            found = FileIdentity.of(os.stat(self.shard.path))
        except OSError:
            raise InputChanged(f"input {self.shard.path} was removed while it was read; run "
                               "the job again") from None
        self._check(found, "while it was read (the path names another file now)", verify)
        if rows is not None:
            self.shard.read_so_far.ranges[(start, stop)] = digest.hexdigest()

    def read(self, start: int, stop: int, buffer: bytearray | None = None,
             digest: PartDigest | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Rows ``start:stop``: features (fp32), labels (or None) and row ids (int64). With
        ``buffer`` (large enough) fp32 features are read into it and alias it. ``digest`` is
        fed the rows read."""
        shard = self.shard
        raw = _read_rows(self.handle, shard.features, start, stop, buffer)
        if digest is not None:
            digest.update(0, raw.view(-1).view(torch.uint8).numpy())
        features = raw.float()
        labels = self._per_row(shard.labels, start, stop)
        ids = self._per_row(shard.row_ids, start, stop)
        if digest is not None:
            for column, values in ((1, labels), (2, ids)):
                if values is not None:
                    digest.update(column, values.numpy())
        if ids is None:
            ids = torch.arange(start, stop, dtype=torch.int64)
        bad = ~torch.isfinite(features.sum(dim=1))  # NaN/Inf reach the row sums
        if bool(bad.any()):
            raise InputError(f"{shard.path}: row {start + int(bad.nonzero()[0, 0])} contains "
                             "NaN or Inf")
        return features, labels, ids

    def _per_row(self, column: Column | None, start: int, stop: int):
        if column is None:
            return None
        per_image = self.shard.per_image
        first, last = start // per_image, -(-stop // per_image)
        values = _read_rows(self.handle, column, first, last).long()
        if per_image > 1:
            values = values.repeat_interleave(per_image)
            values = values[start - first * per_image: stop - first * per_image]
        return values.contiguous()


def _open_regular(path: Path):
    """``path`` opened for reading, refused unless it is a regular file; opened non-blocking so
    that a FIFO put in its place never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        problem = file_problem(path) or (error.strerror or str(error)).lower()
        raise InputError(f"cannot read input {path}: {problem}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"cannot read input {path}: {file_problem(path) or 'not a regular file'}")
    return os.fdopen(fd, "rb")


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
        raise InputChanged(f"{handle.name}: the file is shorter than its header says (changed "
                           "while it was read?)")
    flat = torch.frombuffer(buffer, dtype=column.dtype, count=size // _itemsize(column.dtype))
    return flat.reshape(count, *column.shape[1:])


SAFETENSORS_HEADER_BYTES = 100 * 2**20
"""Largest safetensors header read (the format's own limit)."""


def _safetensors_header(path: Path, handle, size: int) -> tuple[dict, int]:
    head = handle.read(8)
    if len(head) != 8:
        raise InputError(f"{path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", head)
    if length > SAFETENSORS_HEADER_BYTES or 8 + length > size:
        raise InputError(f"{path} is not a safetensors file (header of {length} bytes in a "
                         f"file of {size})")
    try:
        header = loads_json(handle.read(length), f"{path}'s header")
    except JsonError as error:
        raise InputError(f"{path} is not a safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map names to strings")
    return header, 8 + length


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _column(path: Path, header: dict, start: int, size: int, name: str,
            kinds: dict) -> Column | None:
    """The tensor ``name`` of a safetensors header, its entry checked in full (dtype, shape,
    offsets inside the file) before any of its bytes are read."""
    entry = header.get(name)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise InputError(f"{path}: header entry {name!r} is not a JSON object")
    if entry.get("dtype") not in kinds:
        raise InputError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')}, expected one "
                         f"of {sorted(kinds)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise InputError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))
            and offsets[0] <= offsets[1]):
        raise InputError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, "
                         "end] byte offsets")
    begin, end = offsets
    column = Column(start + begin, kinds[entry["dtype"]], tuple(shape))
    expected = column.shape[0] * column.row_bytes if column.shape else _itemsize(column.dtype)
    if end - begin != expected:
        raise InputError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                         f"{list(column.shape)}")
    if start + end > size:
        raise InputError(f"{path}: tensor {name!r} ends at byte {start + end} but the file has "
                         f"{size} bytes (truncated?)")
    return column


def _metadata_json(path: Path, header: dict, key: str, what: str):
    """The JSON value under ``key`` in a safetensors header's metadata, or None."""
    text = header.get("__metadata__", {}).get(key)
    if text is None:
        return None
    try:
        return loads_json(text, f"{path}'s {what}")
    except JsonError as error:
        raise InputError(str(error)) from None


def _cache_stamp(path: Path, header: dict) -> dict | None:
    stamp = _metadata_json(path, header, CACHE_STAMP_KEY, "extraction cache stamp")
    if stamp is None:
        return None
    views = stamp.get("common", {}).get("views") if isinstance(stamp, dict) and isinstance(
        stamp.get("common"), dict) else None
    if not _natural(views) or views < 1:
        raise InputError(f"{path}: unreadable extraction cache stamp (no views >= 1)")
    return stamp


def safetensors_shard(path: Path, handle, identity: FileIdentity) -> Shard:
    """A feature file (``features`` [+ ``labels``]) or an extraction cache shard (``features``,
    ``labels`` and ``image_index`` per image, V views per image)."""
    header, start = _safetensors_header(path, handle, identity.size)
    size = identity.size
    features = _column(path, header, start, size, "features", SAFETENSORS_FLOATS)
    if features is None:
        found = sorted(set(header) - {"__metadata__"})
        raise InputError(f"{path} has no 'features' tensor (found {found})")
    if len(features.shape) != 2:
        raise InputError(f"{path}: features must be 2-D (rows, dim), got {list(features.shape)}")
    labels = _column(path, header, start, size, "labels", SAFETENSORS_LABELS)
    row_ids = _column(path, header, start, size, "image_index", SAFETENSORS_INTS)
    stamp = _cache_stamp(path, header)
    per_image = 1 if stamp is None else stamp["common"]["views"]
    for name, column in (("labels", labels), ("image_index", row_ids)):
        if column is None:
            continue
        if len(column.shape) != 1:
            raise InputError(f"{path}: {name} must be 1-D (rows,), got shape "
                             f"{list(column.shape)}")
        if column.shape[0] * per_image != features.shape[0]:
            raise InputError(f"{path}: {name} has {column.shape[0]} entries for "
                             f"{features.shape[0]} rows")
    table = _column(path, header, start, size, "class_features", SAFETENSORS_FLOATS)
    if table is not None and len(table.shape) != 2:
        raise InputError(f"{path}: class_features must be 2-D (classes, dim), got "
                         f"{list(table.shape)}")
    return Shard(path, features, identity, labels, row_ids, per_image, table, stamp,
                 _source(path, header, stamp))


def _source(path: Path, header: dict, stamp: dict | None) -> dict | None:
    """Where a shard's features come from: a feature file's provenance ``source``; for an
    extraction cache shard (``cache/<split>/shard-*``), the source the cache records."""
    if stamp is not None:
        try:
            return recorded_source(path.parent.parent)
        except FeatureFileError as error:
            raise InputError(f"{path}: {error}") from None
    provenance = _metadata_json(path, header, PROVENANCE_KEY, "provenance")
    source = provenance.get("source") if isinstance(provenance, dict) else None
    return source if isinstance(source, dict) else None


def npy_shard(path: Path, handle, identity: FileIdentity) -> Shard:
    """A 2-D C-order float32/float16/float64 ``.npy`` array (no labels)."""
    try:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(handle)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as error:
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
    column = Column(offset, kinds[dtype], tuple(int(d) for d in shape))
    end = offset + column.shape[0] * column.row_bytes
    if end > identity.size:
        raise InputError(f"{path}: its header says {end} bytes but the file has "
                         f"{identity.size} (truncated?)")
    return Shard(path, column, identity)


def _shard(path: Path) -> Shard:
    if path.suffix not in (".npy", ".safetensors"):
        raise InputError(f"input {path}: expected a .safetensors or .npy file, or a folder of "
                         "them")
    problem = file_problem(path)
    if problem:
        raise InputError(f"cannot read input {path}: {problem}")
    with _open_regular(path) as handle:
        identity = FileIdentity.of(os.fstat(handle.fileno()))
        read = npy_shard if path.suffix == ".npy" else safetensors_shard
        shard = read(path, handle, identity)
    if shard.rows == 0:
        raise InputError(f"input {path} has no rows")
    return shard


def _check_one_extraction(folder: Path, shards: list[Shard]) -> None:
    """The numbered shards of a cache folder must come from one extraction: their stamps'
    common sections (model, checkpoint, preprocessing, dataset, split, seed ...) agree."""
    cached = [s for s in shards if _CACHE_SHARD.match(s.path.name)]
    if not cached:
        return
    first = cached[0]
    for shard in cached:
        number = int(_CACHE_SHARD.match(shard.path.name)[1])
        if shard.stamp is None or first.stamp is None:
            unstamped = shard if shard.stamp is None else first
            raise InputError(f"{folder}: {unstamped.path.name} carries no extraction cache "
                             "stamp; a cache folder's shards must all be stamped by one "
                             "extraction")
        if shard.stamp.get("shard", number) != number:
            raise InputError(f"{folder}: {shard.path.name} is stamped as shard "
                             f"{shard.stamp.get('shard')!r}; a shard was renamed or copied "
                             "from elsewhere")
        ours, theirs = first.stamp["common"], shard.stamp["common"]
        if ours != theirs:
            keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise InputError(f"{folder} mixes shards of different extractions: "
                             f"{first.path.name} and {shard.path.name} differ in "
                             f"{', '.join(map(str, keys[:5]))}")


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
    shards = [_shard(p) for p in files]
    _check_one_extraction(folder, shards)
    return shards


def find_shards(inputs: list[str | os.PathLike]) -> list[Shard]:
    """The shards of every input, in order: a file is one shard, a folder its files. Every
    header is read and checked here, before any row is; a file given twice (by another path
    or a hard link) is refused."""
    if not inputs:
        raise InputError("give at least one input (a feature file, a folder of shards or a .npy)")
    shards: list[Shard] = []
    for given in inputs:
        path = Path(given)
        shards.extend(_folder_shards(path) if path.is_dir() else [_shard(path)])
    seen: dict[tuple[int, int], Path] = {}
    for shard in shards:
        key = (shard.identity.device, shard.identity.inode)
        if key in seen:
            how = "" if seen[key].resolve() == shard.path.resolve() else \
                f" (the same file as {seen[key]}: a link)"
            raise InputError(f"input {shard.path} is given twice{how}")
        seen[key] = shard.path
    return shards

