"""Batch scoring of test sets of any size: :func:`score` streams the rows of its inputs from
disk a chunk at a time, solves them, and writes top-k outputs per input shard.

Work is cut into parts (an input shard's rows, at most ``policy.SCORE_PART_ROWS`` at a time,
fewer with a large top-k: ``policy.SCORE_PART_BYTES``). A part's outputs are written
atomically and then its record (``*.done.json``: the job, the input, a sha256 of the bytes the
part read, fed as they were read, and the output files' sha256). Each input is read through
one open handle, checked before and after every part to be the file that was planned (device,
inode, size, modification and change times): a file rewritten or replaced while it is read
stops the job, and its part is not recorded. A rerun skips exactly the parts whose record
matches, the input's bytes hashed again (a read, no solve), so a job killed at any moment and
run again scores every row once, and an input replaced by other bytes of the same size and
mtime (``cp -p``, ``rsync -a``) is scored again. The folder's ``job.json``, created
atomically after every option was resolved, ties it to one job's settings: another job there
is refused. A reader thread prefetches the next chunk while the current one is solved; memory
stays a few chunks and one part's outputs whatever N is. Under ``torchrun`` each rank takes
whole input shards and writes its own outputs; rank 0 writes ``manifest.json`` from the part
records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..core import validation as check
from ..core.distributed import SINGLE, Context
from ..core.model import VelocityNet, normalizes, solve_settings
from ..core.names import (
    BACKENDS,
    NETWORK_REFERENCE,
    PRECISIONS,
    Backend,
    Precision,
    check_choice,
)
from ..core.policy import (
    PRECISION_DTYPES,
    SCORE_PART_BYTES,
    SCORE_PART_ROWS,
    SCORE_TEXT_ENTRIES,
    SOLVE_BATCH_ROWS,
)
from ..io import checkpoint
from ..io.features import (
    FeatureFileError,
    class_table_difference,
    class_table_sha256,
    differences,
    load_features,
    table_mismatch,
    unit_rows,
)
from ..io.files import (
    JsonError,
    atomic_write,
    check_output_folder,
    create_exclusive,
    file_problem,
    file_sha256,
    is_temporary,
    read_json,
    read_json_record,
    remove_orphaned_temporaries,
    save_safetensors,
    write_text,
)
from ..io.row_sources import InputError, PartDigest, Shard, ShardReader, find_shards
from ..solver.api import solve
from ..solver.plan import check_plan_fits
from ..solver.routing import SolveOptions, resolve

FORMATS = ("safetensors", "npy", "csv", "jsonl")
"""Output formats: binary arrays per part (safetensors, or one .npy per array), or text with
class names (CSV, JSON lines) for small outputs (``policy.SCORE_TEXT_ENTRIES``)."""
JOB_NAME = "job.json"
MANIFEST_NAME = "manifest.json"
JOB_FORMAT = "fma_fast/score-job/1"
PART_FORMAT = "fma_fast/score-part/2"
"""Version 2 records a digest of the part's input bytes (version 1 records are scored again)."""
MANIFEST_FORMAT = "fma_fast/score-manifest/1"


@dataclass
class ScoreSummary:
    """What :func:`score` did: every row of the job (``rows``), those scored by this call
    (``rows_scored``, the rest were done by an earlier run), the parts, wall time and rows/s of
    this call, accuracy at M and at M=0 over the labelled rows (None without labels), the
    solver path and the manifest's path."""

    out: Path
    rows: int
    rows_scored: int
    parts: int
    parts_skipped: int
    seconds: float
    rows_per_s: float
    accuracy: float | None
    accuracy_at_m0: float | None
    path: str | None
    manifest: Path

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        done = (f"scored {self.rows_scored:,} of {self.rows:,} rows in {self.seconds:.1f} s "
                f"({self.rows_per_s:,.0f} rows/s)")
        if self.parts_skipped:
            done += f", {self.parts_skipped} of {self.parts} parts already done"
        accuracy = ""
        if self.accuracy is not None:
            accuracy = (f"; accuracy {100 * self.accuracy:.2f}% (M=0: "
                        f"{100 * self.accuracy_at_m0:.2f}%)")
        return f"{done}{accuracy}; manifest {self.manifest}"


@dataclass(frozen=True)
class _Part:
    shard: Shard
    index: int
    start: int
    stop: int
    stem: str


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def weights_sha256(model: VelocityNet) -> str:
    """A digest of a network's architecture and weights (what the solve depends on)."""
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous()
             for name, tensor in model.state_dict().items()}
    return checkpoint.state_digest(state, json.dumps(model.config, sort_keys=True))


def _resolve_model(model, steps, step_size, normalize):
    """The network, M, h, whether rows are normalised, and a name for messages. A folder is
    loaded (:func:`fma_fast.load` sets what it carries), so a folder and the network loaded
    from it score alike; arguments win over what the network carries
    (:func:`~fma_fast.core.model.solve_settings`, :func:`~fma_fast.core.model.normalizes`)."""
    name = "the model"
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model = checkpoint.load(model)
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet or a folder written by fma_fast.save, got "
                        f"{type(model).__name__}")
    steps, step_size = solve_settings(model, steps, step_size)
    if steps is None:
        raise ValueError(f"{name} has no M chosen on val (model.steps); pass steps")
    steps = check.check_int("steps", steps)
    step_size = check.check_positive_float("step_size", step_size)
    return model, steps, step_size, normalizes(model, normalize), name


def _resolve_classes(classes, class_names):
    """A (C, D) class table and its names, from a tensor/array or a file: a feature file (its
    class table and names), a .npy table or a safetensors file with one 2-D tensor."""
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        problem = file_problem(path)
        if problem:
            raise InputError(f"cannot read --classes {path}: {problem}")
        if path.suffix == ".npy":
            try:
                table = torch.from_numpy(np.load(path)).float()
            except (OSError, ValueError, SyntaxError, RecursionError, MemoryError) as error:
                raise InputError(f"cannot read --classes {path}: {error}") from None
        else:
            try:
                data = load_features(path)
                table, names = data.class_features, data.class_names
                class_names = names if class_names is None else class_names
            except FeatureFileError as error:
                table = _single_table(path, error)
    else:
        table = check.as_tensor("class_features", classes)
    table = check.check_matrix("class_features", table).float()
    check.check_finite("class_features", table)
    if class_names is not None and len(class_names) != table.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names for {table.shape[0]} classes")
    return table, None if class_names is None else list(class_names)


def _check_trained_on(model: VelocityNet, name: str, table: torch.Tensor, names) -> None:
    """The classes given must be the table the model was trained with (names exactly, values
    within fp32 rounding: :func:`~fma_fast.io.features.table_mismatch`)."""
    if not isinstance(model.trained_on, dict):
        return
    given = {"classes": int(table.shape[0]), "class_names": names, "class_table": table,
             "class_table_sha256": class_table_sha256(table)}
    mismatch = table_mismatch(model.trained_on, given)
    if mismatch:
        raise InputError(f"the classes given ({table.shape[0]}) are not the class table {name} "
                         f"was trained with ({model.trained_on.get('classes')} classes): "
                         f"{mismatch}")


def _single_table(path: Path, why: FeatureFileError) -> torch.Tensor:
    """The one 2-D tensor of a safetensors file that is not a feature file (``why``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            tensors = [handle.get_tensor(n) for n in names if handle.get_slice(n).get_shape()
                       and len(handle.get_slice(n).get_shape()) == 2]
    except (SafetensorError, OSError) as error:
        raise InputError(f"cannot read --classes {path}: {error}") from None
    if len(tensors) != 1:
        raise InputError(f"--classes {path}: expected a feature file or one (C, D) tensor, "
                         f"found {names} (as a feature file: {why})")
    return tensors[0]


def _settings(model, steps, step_size, normalize, topk, table, table_digest, precision,
              backend, output_format, batch_size, part_rows) -> dict[str, Any]:
    return {
        "model_sha256": weights_sha256(model),
        "steps": steps,
        "step_size": step_size,
        "normalize": normalize,
        "topk": topk,
        "classes": int(table.shape[0]),
        "class_table_sha256": table_digest,
        "precision": precision,
        "backend": backend,
        "format": output_format,
        "batch_rows": batch_size,
        "part_rows": part_rows,
    }


def _part_rows(topk: int) -> int:
    """Rows per part: ``SCORE_PART_ROWS``, fewer when the top-k outputs (12 bytes an entry)
    would pass ``SCORE_PART_BYTES``."""
    return max(1, min(SCORE_PART_ROWS, SCORE_PART_BYTES // (12 * topk)))


def _check_route(model, steps, step_size, precision, backend, batch_size, device) -> None:
    """Every option resolved as the solve will resolve it, before the folder is claimed: an
    option refused late would leave job.json claiming the folder for a job that cannot run."""
    options = SolveOptions(step_size=step_size, precision=precision, backend=backend,
                           batch_size=batch_size, device=device)
    route = resolve(model, options, steps, torch.device("cpu"))
    if route.network != NETWORK_REFERENCE:
        check_plan_fits(model, steps, PRECISION_DTYPES[precision], route.device)


def _claim_folder(out: Path, settings: dict[str, Any], context: Context) -> str:
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
        out.mkdir(parents=False, exist_ok=True)
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


def _parts(shards: Sequence[Shard], part_rows: int) -> list[list[_Part]]:
    out = []
    for shard in shards:
        stops = list(range(0, shard.rows, part_rows))[1:] + [shard.rows]
        starts = [0] + stops[:-1]
        prefix = _part_prefix(shard)
        out.append([_Part(shard, i, a, b, f"{prefix}{i:05d}")
                    for i, (a, b) in enumerate(zip(starts, stops))])
    return out


def _part_prefix(shard: Shard) -> str:
    tag = hashlib.sha256(str(shard.path.resolve()).encode()).hexdigest()[:8]
    return f"{shard.path.stem}-{tag}.part"


_PART_FILE = re.compile(r"^(?P<prefix>.+\.part)(?P<number>\d{5})\.")


def _remove_stale_parts(out: Path, by_shard: list[list[_Part]]) -> None:
    """Remove the parts an input no longer has (it shrank since an earlier run): their
    record first, so that a kill in between leaves files no record vouches for."""
    counts = {_part_prefix(parts[0].shard): len(parts) for parts in by_shard}
    stale = []
    for path in out.iterdir():
        found = _PART_FILE.match(path.name)
        if found and int(found["number"]) >= counts.get(found["prefix"], 1 << 30):
            stale.append(path)
    for path in sorted(stale, key=lambda p: not p.name.endswith(".done.json")):
        path.unlink(missing_ok=True)


def _record_path(out: Path, part: _Part) -> Path:
    return out / f"{part.stem}.done.json"


def _record(out: Path, part: _Part, job: str) -> dict[str, Any] | None:
    """The part's record when it is of this job, these rows of this input and its outputs are
    there with the digests it lists; else None. The input's bytes are not read here."""
    record = read_json_record(_record_path(out, part))
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


def _already_done(out: Path, parts: list[_Part], job: str, chunk: int) -> set[int]:
    """Which of ``parts`` (by position) a record vouches for and whose input bytes still hash
    to the record's digest (read again, not solved): a same-size replacement with its mtime
    kept is scored again."""
    done = set()
    reader: ShardReader | None = None
    buffer = bytearray()
    try:
        for number, part in enumerate(parts):
            record = _record(out, part, job)
            if record is None:
                continue
            if reader is None or reader.shard is not part.shard:
                if reader is not None:
                    reader.close()
                reader = part.shard.open()
                buffer = bytearray(chunk * part.shard.features.row_bytes)
            digest = PartDigest(part.shard)
            for start in range(part.start, part.stop, chunk):
                reader.read(start, min(start + chunk, part.stop), buffer, digest)
            reader.check_unchanged()
            if digest.hexdigest() == record["input"]["sha256"]:
                done.add(number)
    finally:
        if reader is not None:
            reader.close()
    return done


PREFETCH_DEPTH = 2
"""Chunks read ahead of the one being solved."""


def _prefetch(parts: list[_Part], chunk: int, pin: bool
              ) -> Iterator[tuple[_Part, tuple, str | None]]:
    """(part, (features, labels, ids), digest) chunk by chunk, read ahead in a thread; the
    digest of the part's input bytes comes with its last chunk (None before), after the file
    was checked to be unchanged since it was planned.

    One handle per input shard. The rows land in a ring of ``PREFETCH_DEPTH + 2`` reused
    buffers (queued, being solved, being read): a fresh buffer per chunk would let the heap
    fragment and grow with N. A chunk's features are only valid until the consumer asks for
    the chunk after next.
    """
    items: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)
    stop = threading.Event()
    widest = max((part.shard.features.row_bytes for part in parts), default=0)
    ring = [bytearray(chunk * widest) for _ in range(PREFETCH_DEPTH + 2)] if parts else []

    def put(item) -> bool:
        """Queue ``item`` unless the consumer has stopped; never blocks past a stop."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        reader: ShardReader | None = None
        try:
            number = 0
            for part in parts:
                if reader is None or reader.shard is not part.shard:
                    if reader is not None:
                        reader.close()
                    reader = part.shard.open()
                digest = PartDigest(part.shard)
                for start in range(part.start, part.stop, chunk):
                    buffer = ring[number % len(ring)]
                    number += 1
                    end = min(start + chunk, part.stop)
                    rows = reader.read(start, end, buffer, digest)
                    if pin:
                        rows = (rows[0].pin_memory(), *rows[1:])
                    finished = None
                    if end == part.stop:
                        reader.check_unchanged()
                        finished = digest.hexdigest()
                    if not put((part, rows, finished)):
                        return
            put(None)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)
        finally:
            if reader is not None:
                reader.close()

    reader = threading.Thread(target=read, name="fma-fast-score-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = items.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


def _text_rows(indices, values, ids, labels, names) -> Iterator[dict[str, Any]]:
    for row in range(indices.shape[0]):
        entry: dict[str, Any] = {"row": int(ids[row])}
        if labels is not None:
            entry["label"] = int(labels[row])
        entry["topk"] = [[int(c), None if names is None else names[int(c)],
                          round(float(v), 6)] for c, v in zip(indices[row], values[row])]
        yield entry


def _write_part(out: Path, part: _Part, arrays: dict[str, torch.Tensor], output_format: str,
                names, job: str) -> list[Path]:
    """The part's output files, each written atomically; their paths."""
    stem = out / part.stem
    if output_format == "safetensors":
        meta = {"fma_fast_score": json.dumps({"job": job, "input": part.shard.path.name,
                                              "rows": [part.start, part.stop]}, sort_keys=True)}
        return [save_safetensors(f"{stem}.safetensors", arrays, meta)]
    if output_format == "npy":
        written = []
        for name, array in arrays.items():
            path = Path(f"{stem}.{name}.npy")

            def save(temp: Path, array=array) -> None:
                with open(temp, "wb") as handle:
                    np.save(handle, array.numpy(), allow_pickle=False)

            written.append(atomic_write(path, save))
        return written
    rows = _text_rows(arrays["topk_indices"], arrays["topk_values"], arrays["row_ids"],
                      arrays.get("labels"), names)
    if output_format == "jsonl":
        text = "".join(json.dumps(entry) + "\n" for entry in rows)
        return [write_text(f"{stem}.jsonl", text)]
    k = arrays["topk_indices"].shape[1]
    header = ["row"] + (["label"] if "labels" in arrays else [])
    header += [f"{field}_{r + 1}" for r in range(k) for field in ("class", "name", "cosine")]
    text = io.StringIO()
    writer = csv.writer(text)  # RFC 4180: CRLF rows, fields with , " CR or LF quoted
    writer.writerow(header)
    for entry in rows:
        cells = [entry["row"]] + ([entry["label"]] if "label" in entry else [])
        for c, name, v in entry["topk"]:
            cells += [c, "" if name is None else name, f"{v:.6f}"]
        writer.writerow(cells)
    return [atomic_write(f"{stem}.csv", lambda temp: temp.write_text(text.getvalue(),
                                                                    newline=""))]


def score(
    model,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    classes,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    step_size: float | None = None,
    normalize: bool | None = None,
    topk: int = 1,
    output_format: str = "safetensors",
    class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    context: Context = SINGLE,
) -> ScoreSummary:
    """Score every row of ``inputs`` with ``model`` and write top-``topk`` outputs under ``out``.

    ``model``: a :class:`VelocityNet` or a folder written by :func:`fma_fast.save`, which
    score alike: M, h and whether rows are L2-normalised come from the arguments, else from
    what the model carries (a loaded folder's config.json), else h=0.1 and normalised
    (:func:`~fma_fast.core.model.solve_settings`); the class table must be the one the model was
    trained with, when it says. ``inputs``: safetensors feature files, folders of shards (an
    extraction cache split included) or ``.npy`` arrays, or one such path, read a chunk at a
    time. ``classes``: a (C, D) table (tensor, ``.npy`` or safetensors) or a feature file (its
    table and names). Per part of each input: ``topk_indices``, ``topk_values`` (cosines),
    ``row_ids`` (and ``labels``) as ``output_format``; ``manifest.json`` sums the job up.
    Labelled inputs give the accuracy at M and at M=0 from the same pass. Resumable: see the
    module docstring.
    """
    started = time.perf_counter()
    model, steps, step_size, normalize, model_name = _resolve_model(model, steps, step_size,
                                                                    normalize)
    check_choice("output_format", output_format, FORMATS)
    check_choice("precision", precision, PRECISIONS)
    check_choice("backend", backend, BACKENDS)
    topk = check.check_int("topk", topk, minimum=1)
    table, names = _resolve_classes(classes, class_names)
    if normalize:  # as eval normalises a file's rows and class table
        table = unit_rows(table)[0]
    if table.shape[1] != model.dim:
        raise ValueError(f"the class table has dim {table.shape[1]} but the model expects "
                         f"{model.dim}")
    if topk > table.shape[0]:
        raise ValueError(f"topk must be <= the number of classes {table.shape[0]}, got {topk}")
    _check_trained_on(model, model_name, table, names)
    digest = class_table_sha256(table)
    device = context.device(device)
    part_rows = _part_rows(topk)
    batch_size = check.check_int("batch_size", batch_size if batch_size is not None
                                 else SOLVE_BATCH_ROWS.get(device.type, 4096), minimum=1)
    batch_size = min(batch_size, part_rows)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    shards = find_shards(list(inputs))
    classes_count = int(table.shape[0])
    for shard in shards:
        if shard.dim != model.dim:
            raise InputError(f"{shard.path}: rows have dim {shard.dim} but the model expects "
                             f"{model.dim}")
        own = shard.read_class_table()
        if own is not None and normalize:
            own = unit_rows(own)[0]
        difference = None if own is None else class_table_difference(own, table)
        if difference:
            raise InputError(f"{shard.path} carries another class table than the classes given "
                             f"({own.shape[0]} vs {table.shape[0]} classes: {difference})")
        found = shard.label_range()
        if found is not None and (found[0] < 0 or found[1] >= classes_count):
            raise InputError(f"{shard.path}: labels must lie in [0, {classes_count}) for the "
                             f"{classes_count} classes given, got values in [{found[0]}, "
                             f"{found[1]}]")
    total = sum(shard.rows for shard in shards)
    if output_format in ("csv", "jsonl") and total * topk > SCORE_TEXT_ENTRIES:
        raise ValueError(f"{output_format} output is for small jobs (rows x topk <= "
                         f"{SCORE_TEXT_ENTRIES:,}); {total:,} rows x {topk} is more: use "
                         "safetensors or npy")
    out = check_output_folder(Path(out), "--out")
    model = model.to(device).eval()
    _check_route(model, steps, step_size, precision, backend, batch_size, device)
    settings = _settings(model, steps, step_size, normalize, topk, table, digest, precision,
                         backend, output_format, batch_size, part_rows)
    job = _claim_folder(out, settings, context)

    by_shard = _parts(shards, part_rows)
    mine_by_shard = [parts for number, parts in enumerate(by_shard)
                     if context.owner(number) == context.rank]
    _remove_stale_parts(out, mine_by_shard)
    mine = [part for parts in mine_by_shard for part in parts]
    done = _already_done(out, mine, job, batch_size)
    pending = [part for number, part in enumerate(mine) if number not in done]
    table_device = table.to(device)
    bar = tqdm(total=sum(p.stop - p.start for p in pending), unit="rows", unit_scale=True,
               desc="score", disable=None if progress else True, leave=False)
    path = None
    collected: dict[str, list[torch.Tensor]] = {}
    counts = [0, 0]
    for part, (features, labels, ids), input_digest in _prefetch(pending, batch_size,
                                                                 pin=device.type == "cuda"):
        if normalize:
            features = unit_rows(features)[0]
        result = solve(features.to(device, non_blocking=True), model, steps,
                       step_size=step_size, class_features=table_device, topk=topk,
                       batch_size=batch_size, device=device, precision=precision,
                       backend=backend, zero_shot=labels is not None)
        path = result.path
        chunk = {"topk_indices": result.topk_indices.cpu(),
                 "topk_values": result.topk_values.cpu(), "row_ids": ids}
        if labels is not None:
            chunk["labels"] = labels
            counts[0] += int((result.pred.cpu() == labels).sum())
            counts[1] += int((result.zero_shot_pred.cpu() == labels).sum())
        for name, value in chunk.items():
            collected.setdefault(name, []).append(value)
        bar.update(features.shape[0])
        if input_digest is not None:
            arrays = {name: torch.cat(values) for name, values in collected.items()}
            files = _write_part(out, part, arrays, output_format, names, job)
            record = {"format": PART_FORMAT, "job": job,
                      "input": {**part.shard.record(), "sha256": input_digest},
                      "rows": [part.start, part.stop], "labelled": "labels" in arrays,
                      "correct": counts[0], "correct_m0": counts[1], "path": path,
                      "files": {f.name: file_sha256(f) for f in files}}
            write_text(_record_path(out, part), json.dumps(record, sort_keys=True) + "\n")
            collected, counts = {}, [0, 0]
    bar.close()
    context.barrier()
    seconds = time.perf_counter() - started
    scored = sum(p.stop - p.start for p in pending)
    return _manifest(out, by_shard, job, settings, context, (scored, len(mine) - len(pending)),
                     seconds, path)


def _manifest(out, by_shard, job, settings, context, work, seconds, path) -> ScoreSummary:
    """Every part's record read back (all ranks' parts), the summary, and on rank 0 the
    manifest. rows/s: the rows scored by every rank over the slowest rank's wall time."""
    records = []
    for parts in by_shard:
        for part in parts:
            record = _record(out, part, job)
            if record is None:
                raise InputError(f"part {part.stem} has no outputs after the job (removed or "
                                 f"changed in {out} while the job ran?); run the job again")
            records.append((part, record))
    rows = sum(p.stop - p.start for p, _ in records)
    labelled = [(p, r) for p, r in records if r["labelled"]]
    labelled_rows = sum(p.stop - p.start for p, _ in labelled)
    accuracy = m0 = None
    if labelled_rows:
        accuracy = sum(r["correct"] for _, r in labelled) / labelled_rows
        m0 = sum(r["correct_m0"] for _, r in labelled) / labelled_rows
    path = path or next((r.get("path") for _, r in records if r.get("path")), None)
    gathered = context.gather((*work, seconds))
    scored_all = sum(g[0] for g in gathered)
    skipped = sum(g[1] for g in gathered)
    slowest = max(g[2] for g in gathered)
    summary = ScoreSummary(
        out=out, rows=rows, rows_scored=scored_all, parts=len(records), parts_skipped=skipped,
        seconds=slowest, rows_per_s=scored_all / slowest if slowest > 0 else 0.0,
        accuracy=accuracy, accuracy_at_m0=m0, path=path, manifest=out / MANIFEST_NAME)
    if context.is_main:
        shards = []
        for parts in by_shard:
            entries = [r for p, r in records if p.shard is parts[0].shard]
            shards.append({"input": parts[0].shard.record(), "rows": parts[0].shard.rows,
                           "parts": [{"rows": r["rows"], "input_sha256": r["input"]["sha256"],
                                      "files": r["files"]} for r in entries]})
        manifest = {
            "format": MANIFEST_FORMAT, "job": job, "settings": settings, "rows": rows,
            "labelled_rows": labelled_rows, "accuracy": accuracy, "accuracy_at_m0": m0,
            "path": path, "this_run": {"rows_scored": scored_all, "wall_s": round(slowest, 3),
                                       "rows_per_s": round(summary.rows_per_s, 1),
                                       "processes": context.world_size,
                                       "rows_by_rank": [g[0] for g in gathered]},
            "versions": {"fma_fast": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "inputs": shards,
        }
        write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    context.barrier()
    return summary
