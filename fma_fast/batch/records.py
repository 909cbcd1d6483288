"""A scoring job's records in its output folder: ``job.json``, which ties the folder to one job's
settings, and each part's ``*.done.json``, which vouches for its outputs and the input bytes
they came from (a rerun skips exactly the parts whose record still holds)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.distributed import Context
from ..io.features import differences
from ..io.files import (
    JsonError,
    create_exclusive,
    file_sha256,
    is_temporary,
    read_json,
    read_json_record,
    remove_orphaned_temporaries,
    write_text,
)
from ..io.row_sources import InputError, PartDigest, ShardReader
from .reader import Part, part_prefix, reader_for

JOB_NAME = "job.json"
JOB_FORMAT = "fma_fast/score-job/1"
PART_FORMAT = "fma_fast/score-part/3"
"""Version 2 records a digest of the part's input bytes (version 1 records are scored again)."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def claim_folder(out: Path, settings: dict[str, Any], context: Context) -> str:
    """Tie ``out`` to this job (``job.json``, created atomically: of two jobs racing for one
    folder one wins); another job's folder is refused. Temporary files of killed writers are
    removed first, and those of live writers do not make a folder "not empty"."""
    digest = _digest(settings)
    record = out / JOB_NAME
    text = json.dumps({"format": JOB_FORMAT, "digest": digest, "settings": settings},
                      indent=1, sort_keys=True) + "\n"
    problem = None
    if context.is_main:
        try:
            problem = _claim(out, record, text, digest, settings)
        except InputError as error:
            problem = str(error)
    problem = context.broadcast(problem)
    if problem:
        raise InputError(problem)
    return digest


def _claim(out: Path, record: Path, text: str, digest: str, settings) -> str | None:
    if out.is_dir():
        remove_orphaned_temporaries(out)
    if not record.exists():
        if out.exists() and any(not is_temporary(p.name) for p in out.iterdir()):
            return (f"--out {out} is not empty and holds no scoring job; use an empty or new "
                    "folder")
        out.mkdir(parents=True, exist_ok=True)
        if create_exclusive(record, text):
            return None
    try:
        found = read_json(record, "scoring job record")
    except JsonError as error:
        return f"--out {out}: {error}"
    if not isinstance(found, dict) or found.get("format") != JOB_FORMAT:
        return f"--out {out}: {record} is not a scoring job record"
    if found.get("digest") != digest:
        shown = differences(found.get("settings") or {}, settings)
        return (f"--out {out} holds the outputs of another scoring job ({shown}); use another "
                "folder")
    return None


_PART_FILE = re.compile(r"^(?P<prefix>.+\.part)(?P<number>\d{5})\.")


def remove_stale_parts(out: Path, by_shard: list[list[Part]], mine: list[list[Part]],
                       context: Context) -> None:
    """Remove the parts no input of the job has: those past the end of an input that shrank
    since an earlier run (each rank for the inputs it scores, ``mine``) and, on rank 0, every
    part of an input that left the job (dropped from the inputs, or a link that names another
    file now: parts are named after the resolved path), so that the folder holds the outputs
    of this job's inputs only. Records go first, so that a kill in between leaves files no
    record vouches for. Other writers' temporary files are left alone."""
    counts = {part_prefix(parts[0].shard): len(parts) for parts in mine}
    job = {part_prefix(parts[0].shard) for parts in by_shard}
    stale = []
    for path in out.iterdir():
        found = _PART_FILE.match(path.name)
        if not found or is_temporary(path.name):
            continue
        prefix = found["prefix"]
        if prefix in counts and int(found["number"]) >= counts[prefix] or \
                prefix not in job and context.is_main:
            stale.append(path)
    for path in sorted(stale, key=lambda p: not p.name.endswith(".done.json")):
        path.unlink(missing_ok=True)


def record_path(out: Path, part: Part) -> Path:
    return out / f"{part.stem}.done.json"


def read_record(out: Path, part: Part, job: str) -> dict[str, Any] | None:
    """The part's record when it is of this job, these rows of this input and its outputs are
    there with the digests it lists; else None. The input's bytes are not read here."""
    record = read_json_record(record_path(out, part))
    if record is None or record.get("format") != PART_FORMAT or record.get("job") != job:
        return None
    found = record.get("input")
    if not isinstance(found, dict) or found.get("path") != part.shard.record()["path"] or \
            not isinstance(found.get("sha256"), str) or \
            record.get("rows") != [part.start, part.stop]:
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, digest in files.items():
        path = out / name
        if not isinstance(name, str) or "/" in name or not path.is_file() or \
                file_sha256(path) != digest:
            return None
    return record


def already_done(out: Path, parts: list[Part], job: str, chunk: int,
                 rehash: Callable[[Part], str] | None = None) -> set[int]:
    """Which of ``parts`` (by position) a record vouches for and whose input bytes still hash
    to the record's digest (read again, not solved): a same-size replacement with its mtime
    kept is scored again. ``rehash``: the digest of a part of inputs that are not feature
    shards (images), computed as the job computed it."""
    done = set()
    reader: ShardReader | None = None
    buffer = bytearray()
    try:
        for number, part in enumerate(parts):
            record = read_record(out, part, job)
            if record is None:
                continue
            if rehash is not None:
                if rehash(part) == record["input"]["sha256"]:
                    done.add(number)
                continue
            reader = reader_for(part, reader)
            if len(buffer) < chunk * part.shard.features.row_bytes:
                buffer = bytearray(chunk * part.shard.features.row_bytes)
            digest = PartDigest(part.shard)
            for start in range(part.start, part.stop, chunk):
                reader.read(start, min(start + chunk, part.stop), buffer, digest)
            reader.check_unchanged((part.start, part.stop, digest))
            if digest.hexdigest() == record["input"]["sha256"]:
                done.add(number)
    finally:
        if reader is not None:
            reader.close()
    return done


def read_records(out: Path, by_shard: list[list[Part]], job: str
                 ) -> list[tuple[Part, dict[str, Any]]]:
    """Every part's record once the job ran (all ranks' parts); a part without one was removed
    or changed while the job ran, which is refused."""
    records = []
    for parts in by_shard:
        for part in parts:
            record = read_record(out, part, job)
            if record is None:
                raise InputError(f"part {part.stem} has no outputs after the job (removed or "
                                 f"changed in {out} while the job ran?); run the job again")
            records.append((part, record))
    return records


def write_record(out: Path, part: Part, job: str, input_digest: str, files: list[Path],
                 **outcome: Any) -> None:
    """The part's record, written once its output ``files`` are: the job, the input and the
    digest of the bytes it read, the rows, the ``outcome`` (labelled, correct counts, path)
    and every output's sha256."""
    record = {"format": PART_FORMAT, "job": job,
              "input": {**part.shard.record(), "sha256": input_digest},
              "rows": [part.start, part.stop], **outcome,
              "files": {f.name: file_sha256(f) for f in files}}
    write_text(record_path(out, part), json.dumps(record, sort_keys=True) + "\n")
