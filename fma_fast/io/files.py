"""Files that keep a user's data safe: atomic writes, byte-stable safetensors, path checks.

Every file fma_fast writes goes through :func:`atomic_write` (a temporary file beside the
target, fsync, then rename), so a kill or a full disk leaves the old file or the new one,
never half of one. Temporary files carry the writer's host and process id; those of a
process that no longer runs are removed by the next write into the same folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
"""Temporary names of fma_fast 0.1 (tempfile.mkstemp): no owner recorded."""
LEGACY_TEMP_AGE_S = 3600
"""A 0.1-style temporary file this old is taken as orphaned (its writer is long gone)."""

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
"""safetensors' name of each dtype fma_fast writes or reads."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` left by writers that were killed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match:
            orphaned = match["host"] == _HOST and not _process_alive(int(match["pid"]))
        elif _LEGACY_TEMP.match(entry.name):
            try:
                orphaned = now - entry.stat().st_mtime > LEGACY_TEMP_AGE_S
            except OSError:
                continue
        else:
            continue
        if orphaned:
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _as_os_error(error: Exception, path: Path) -> OSError | None:
    """An OSError for a writer's error that wraps one (safetensors' Rust I/O errors do)."""
    found = re.search(r"os error (\d+)", str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then rename: nobody sees half a file.

    The parent folder is created when missing. On any error the temporary file is removed and
    whatever ``path`` held before is untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path.parent)
    temp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # Created here with the usual mode of a new file (the kernel applies the umask); the
    # writer then truncates and fills it, which keeps the mode.
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        try:
            write(temp)
        except OSError as error:
            if error.filename is not None or error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(path)) from None
        except Exception as error:
            wrapped = _as_os_error(error, path)
            if wrapped is None:
                raise
            raise wrapped from None
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` (of any process)."""
    return bool(_TEMP.match(name) or _LEGACY_TEMP.match(name))


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it already exists (then False): the file appears
    whole (written to a temporary file, then hard-linked into place), and of writers racing
    for one name exactly one wins. Where the file system has no hard links, it is created with
    O_EXCL and then written."""
    path = Path(path)
    temp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        _write_new(temp, text)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                                   errno.ENOSYS):
                raise
    finally:
        temp.unlink(missing_ok=True)
    try:
        _write_new(path, text)
    except FileExistsError:
        return False
    return True


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (FileExistsError if it exists) holding ``text``, on disk when it
    returns."""
    with open(path, "x") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


JSON_MAX_DEPTH = 64
"""Deepest nesting of a JSON document fma_fast reads (its own nest a few levels): Python's
parser recurses once per level, so a hostile file of 100,000 brackets raises RecursionError."""
JSON_MAX_BYTES = 256 * 2**20
"""Largest JSON file read (a model's config with 200,000 class names is a few MiB)."""
_JSON_STRING = re.compile(r'"(?:[^"\\]+|\\.)*+(?:"|\\?\Z)', re.DOTALL)
"""A JSON string, or what is left of the text after an opening quote that is never closed:
every match attempt succeeds where it starts and never backtracks, so removing the strings is
linear (a pattern that must find the closing quote rescans the rest of the text from every
unclosed quote: quadratic, minutes for 1 MB of '"\\')."""
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_CHUNK = 1 << 20


class JsonError(ValueError):
    """A JSON document that is unreadable, too large or nested too deep."""


def loads_json(text: str | bytes, what: str) -> Any:
    """Parse JSON (``what`` names it in errors), refusing nesting deeper than
    :data:`JSON_MAX_DEPTH` before the parser sees it: the one JSON reader of fma_fast's files,
    records, headers and stamps."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise JsonError(f"{what} is not UTF-8 text") from None
    deepest = _nesting(_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode())
    if deepest > JSON_MAX_DEPTH:
        raise JsonError(f"{what} nests JSON {deepest} levels deep (at most {JSON_MAX_DEPTH})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JsonError(f"{what} is not valid JSON ({error})") from None
    except RecursionError:  # the scan above counts what the parser nests; kept as a backstop
        raise JsonError(f"{what} nests JSON too deep (at most {JSON_MAX_DEPTH})") from None


def _nesting(brackets: bytes) -> int:
    """The deepest nesting of a run of brackets, counted a chunk at a time (a hostile file
    can hold 256 MiB of them)."""
    depth = deepest = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = np.frombuffer(brackets[start:start + _DEPTH_CHUNK], dtype=np.uint8)
        levels = depth + np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1))
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON document in file ``path`` (a regular file of at most :data:`JSON_MAX_BYTES`);
    :class:`JsonError` naming ``what`` and the path otherwise."""
    problem = file_problem(path)
    if problem:
        raise JsonError(f"cannot read {what} {path}: {problem}")
    try:
        with open(path, "rb") as handle:
            data = handle.read(JSON_MAX_BYTES + 1)
    except OSError as error:
        raise JsonError(f"cannot read {what} {path}: {(error.strerror or str(error)).lower()}"
                        ) from None
    if len(data) > JSON_MAX_BYTES:
        raise JsonError(f"{what} {path} is larger than {JSON_MAX_BYTES // 2**20} MiB")
    return loads_json(data, f"{what} {path}")


def read_json_record(path: Path) -> dict | None:
    """A JSON object written by fma_fast (a record beside outputs), or None when it is not
    readable as one."""
    try:
        found = read_json(path, "record")
    except JsonError:
        return None
    return found if isinstance(found, dict) else None


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text))


def _tensor_bytes(tensor: torch.Tensor):
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file atomically, with the same bytes for the same content.

    safetensors' own writer orders metadata keys at random from one process to the next; here
    the header is sorted JSON, tensors are laid out largest element first (so every tensor is
    aligned), then by name, and streamed without a copy of the whole file.
    """
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        if not all(isinstance(v, str) for v in metadata.values()):
            raise TypeError("safetensors metadata values must be strings")
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)))
            handle.write(text)
            for name in names:
                handle.write(_tensor_bytes(tensors[name]))

    return atomic_write(path, write)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("no such file", "permission denied", "a FIFO,
    not a regular file", ...), or None when it can. The type is checked before any open: opening
    a FIFO for reading blocks until a writer comes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except PermissionError:
        return "permission denied"
    except OSError as error:
        return (error.strerror or str(error)).lower()
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return f"{_KINDS.get(stat.S_IFMT(mode), 'special file')}, not a regular file"
    try:
        with open(path, "rb"):
            return None
    except PermissionError:
        return "permission denied"
    except OSError as error:
        return (error.strerror or str(error)).lower()


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def _writable_problem(folder: Path) -> str | None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return (error.strerror or str(error)).lower()


def nearest_existing_folder(path: Path, name: str, shown: Path | None = None) -> Path:
    """The nearest existing folder above (or at) ``path``: missing parents are created on
    write, as ``save()`` does, so they must be creatable there; a file in the way is refused."""
    home = path
    while not home.exists() and home != home.parent:
        home = home.parent
    if not home.is_dir():
        raise ValueError(f"{name} {shown or path}: {home} is a file, not a folder")
    return home


def check_output_folder(path: str | os.PathLike, name: str) -> Path:
    """A folder to write into: an existing writable folder, or a new one (missing parents
    included) under a writable folder. Checked before any work starts, so a typo costs
    nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is an existing file, not a folder")
    home = nearest_existing_folder(path, name)
    problem = _writable_problem(home)
    if problem:
        raise ValueError(f"{name} {path}: cannot write in {home}: {problem}")
    return path


def check_output_file(
    path: str | os.PathLike, name: str, *, kind: str, is_kind: Callable[[Path], bool]
) -> Path:
    """A file to (over)write: not a folder, under a writable folder (missing parents are
    created on write), and, when it exists, a ``kind`` file that fma_fast wrote
    (``is_kind``), never some other file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; give a file name")
    home = nearest_existing_folder(path.parent, name, shown=path)
    problem = _writable_problem(home)
    if problem:
        raise ValueError(f"{name} {path}: cannot write in {home}: {problem}")
    if path.exists() and not is_kind(path):
        raise ValueError(f"{name} {path} exists and is not {kind}; refusing to overwrite it")
    return path


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which file, and that nothing half-written
    was left (every write is atomic)."""
    what = (error.strerror or str(error)).lower()
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{what}{where}: nothing was half-written; earlier files are untouched"
    return f"{what}{where}"
