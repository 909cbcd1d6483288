"""Batch scoring of test sets of any size: :func:`score` streams the rows of its inputs from
disk a chunk at a time, solves them, and writes top-k outputs per input shard.

Work is cut into parts (an input shard's rows, at most ``policy.SCORE_PART_ROWS`` at a time).
A part's outputs are written atomically and then its record (``*.done.json``: the job, the
input's size and mtime, the output files' sha256); a rerun skips exactly the parts whose
record matches, so a job killed at any moment and run again scores every row once. The
folder's ``job.json`` ties it to one job's settings: another job there is refused. A reader
thread prefetches the next chunk while the current one is solved; memory stays a few chunks
and one part's outputs whatever N is. Under ``torchrun`` each rank takes whole input shards
and writes its own outputs; rank 0 writes ``manifest.json`` from the part records.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _validation as check
from . import checkpoint
from ._io import (
    atomic_write,
    check_output_folder,
    file_problem,
    file_sha256,
    read_json_record,
    save_safetensors,
    write_text,
)
from ._version import __version__
from .distributed import SINGLE, Context
from .features_io import FeatureFileError, class_table_sha256, differences, load_features
from .model import VelocityNet
from .policy import (
    PRECISIONS,
    SCORE_PART_ROWS,
    SCORE_TEXT_ENTRIES,
    SOLVE_BACKENDS,
    SOLVE_BATCH_ROWS,
)
from .row_sources import InputError, Shard, find_shards
from .solver import solve

FORMATS = ("safetensors", "npy", "csv", "jsonl")
"""Output formats: binary arrays per part (safetensors, or one .npy per array), or text with
class names (CSV, JSON lines) for small outputs (``policy.SCORE_TEXT_ENTRIES``)."""
JOB_NAME = "job.json"
MANIFEST_NAME = "manifest.json"
JOB_FORMAT = "fma_fast/score-job/1"
PART_FORMAT = "fma_fast/score-part/1"
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


def _resolve_model(model, steps, step_size):
    """The network, M, h and the class-table digest it was trained with (None if unknown)."""
    trained_on = None
    if isinstance(model, (str, os.PathLike)):
        folder = model
        config = checkpoint.load_config(folder)
        data = config.get("data")
        if isinstance(data, dict) and isinstance(data.get("class_table_sha256"), str):
            trained_on = (folder, data["class_table_sha256"], data.get("classes"))
        model = checkpoint.load(folder)
        if steps is None:
            steps = config.get("steps")
            if steps is None:
                raise ValueError(f"{folder} has no M chosen on val; pass steps")
        if step_size is None:
            step_size = config.get("step_size", 0.1)
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet or a folder written by fma_fast.save, got "
                        f"{type(model).__name__}")
    if steps is None:
        raise ValueError("steps is required with a model object (a saved folder may carry it)")
    step_size = 0.1 if step_size is None else step_size
    steps = check.check_int("steps", steps)
    return model, steps, check.check_positive_float("step_size", step_size), trained_on


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
            except (OSError, ValueError) as error:
                raise InputError(f"cannot read --classes {path}: {error}") from None
        else:
            try:
                data = load_features(path)
                table, names = data.class_features, data.class_names
                class_names = names if class_names is None else class_names
            except FeatureFileError:
                table = _single_table(path)
    else:
        table = check.as_tensor("class_features", classes)
    table = check.check_matrix("class_features", table).float()
    check.check_finite("class_features", table)
    if class_names is not None and len(class_names) != table.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names for {table.shape[0]} classes")
    return table, None if class_names is None else list(class_names)


def _single_table(path: Path) -> torch.Tensor:
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
                         f"found {names}")
    return tensors[0]


def _settings(model, steps, step_size, topk, table, table_digest, precision, backend,
              output_format, batch_size) -> dict[str, Any]:
    return {
        "model_sha256": weights_sha256(model),
        "steps": steps,
        "step_size": step_size,
        "topk": topk,
        "classes": int(table.shape[0]),
        "class_table_sha256": table_digest,
        "precision": precision,
        "backend": backend,
        "format": output_format,
        "batch_rows": batch_size,
        "part_rows": SCORE_PART_ROWS,
    }


def _claim_folder(out: Path, settings: dict[str, Any], context: Context) -> str:
    """Tie ``out`` to this job (``job.json``); another job's folder is refused."""
    digest = _digest(settings)
    record = out / JOB_NAME
    if context.is_main:
        if record.exists():
            found = read_json_record(record)
            if found is None or found.get("format") != JOB_FORMAT:
                raise InputError(f"--out {out}: {record} is not a scoring job record")
            if found.get("digest") != digest:
                shown = differences(found.get("settings") or {}, settings)
                raise InputError(f"--out {out} holds the outputs of another scoring job "
                                 f"({shown}); use another folder")
        else:
            if out.exists() and any(out.iterdir()):
                raise InputError(f"--out {out} is not empty and holds no scoring job; use an "
                                 "empty or new folder")
            out.mkdir(parents=False, exist_ok=True)
            text = json.dumps({"format": JOB_FORMAT, "digest": digest, "settings": settings},
                              indent=1, sort_keys=True)
            write_text(record, text + "\n")
    context.barrier()
    return digest


def _parts(shards: Sequence[Shard]) -> list[list[_Part]]:
    out = []
    for shard in shards:
        tag = hashlib.sha256(str(shard.path.resolve()).encode()).hexdigest()[:8]
        stops = list(range(0, shard.rows, SCORE_PART_ROWS))[1:] + [shard.rows]
        starts = [0] + stops[:-1]
        out.append([_Part(shard, i, a, b, f"{shard.path.stem}-{tag}.part{i:05d}")
                    for i, (a, b) in enumerate(zip(starts, stops))])
    return out


def _record_path(out: Path, part: _Part) -> Path:
    return out / f"{part.stem}.done.json"


def _done(out: Path, part: _Part, job: str) -> dict[str, Any] | None:
    """The part's record when its outputs exist for this job and this input, else None."""
    record = read_json_record(_record_path(out, part))
    if record is None or record.get("job") != job:
        return None
    if record.get("input") != part.shard.identity() or record.get("rows") != [part.start,
                                                                              part.stop]:
        return None
    for name, digest in (record.get("files") or {}).items():
        path = out / name
        if not path.is_file() or file_sha256(path) != digest:
            return None
    return record


PREFETCH_DEPTH = 2
"""Chunks read ahead of the one being solved."""


def _prefetch(parts: list[_Part], chunk: int, pin: bool) -> Iterator[tuple[_Part, tuple]]:
    """(part, (features, labels, ids)) chunk by chunk, read ahead in a thread.

    The rows land in a ring of ``PREFETCH_DEPTH + 2`` reused buffers (queued, being solved,
    being read): a fresh buffer per chunk would let the heap fragment and grow with N. A
    chunk's features are only valid until the consumer asks for the chunk after next.
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
        try:
            number = 0
            for part in parts:
                for start in range(part.start, part.stop, chunk):
                    buffer = ring[number % len(ring)]
                    number += 1
                    rows = part.shard.read(start, min(start + chunk, part.stop), buffer)
                    if pin:
                        rows = (rows[0].pin_memory(), *rows[1:])
                    if not put((part, rows)):
                        return
            put(None)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

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
    lines = [",".join(header)]
    for entry in rows:
        cells = [str(entry["row"])] + ([str(entry["label"])] if "label" in entry else [])
        for c, name, v in entry["topk"]:
            cells += [str(c), "" if name is None else _csv_cell(name), f"{v:.6f}"]
        lines.append(",".join(cells))
    return [write_text(f"{stem}.csv", "\n".join(lines) + "\n")]


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def score(
    model,
    inputs: Sequence[str | os.PathLike],
    classes,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    step_size: float | None = None,
    topk: int = 1,
    output_format: str = "safetensors",
    class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    backend: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    context: Context = SINGLE,
) -> ScoreSummary:
    """Score every row of ``inputs`` with ``model`` and write top-``topk`` outputs under ``out``.

    ``model``: a :class:`VelocityNet` or a folder written by :func:`fma_fast.save` (its chosen
    M and step size are the defaults). ``inputs``: safetensors feature files, folders of shards
    (an extraction cache split included) or ``.npy`` arrays, read a chunk at a time. ``classes``:
    a (C, D) table (tensor, ``.npy`` or safetensors) or a feature file (its table and names).
    Per part of each input: ``topk_indices``, ``topk_values`` (cosines), ``row_ids`` (and
    ``labels``) as ``output_format``; ``manifest.json`` sums the job up. Labelled inputs give the
    accuracy at M and at M=0 from the same pass. Resumable: see the module docstring.
    """
    started = time.perf_counter()
    model, steps, step_size, trained_on = _resolve_model(model, steps, step_size)
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if backend not in SOLVE_BACKENDS:
        raise ValueError(f"backend must be one of {SOLVE_BACKENDS}, got {backend!r}")
    topk = check.check_int("topk", topk, minimum=1)
    table, names = _resolve_classes(classes, class_names)
    if table.shape[1] != model.dim:
        raise ValueError(f"the class table has dim {table.shape[1]} but the model expects "
                         f"{model.dim}")
    if topk > table.shape[0]:
        raise ValueError(f"topk must be <= the number of classes {table.shape[0]}, got {topk}")
    digest = class_table_sha256(table)
    if trained_on is not None and trained_on[1] != digest:
        raise InputError(f"the classes given ({table.shape[0]}) are not the class table "
                         f"{trained_on[0]} was trained with ({trained_on[2]} classes)")
    device = context.device(device)
    batch_size = check.check_int("batch_size", batch_size if batch_size is not None
                                 else SOLVE_BATCH_ROWS.get(device.type, 4096), minimum=1)
    shards = find_shards(list(inputs))
    for shard in shards:
        if shard.dim != model.dim:
            raise InputError(f"{shard.path}: rows have dim {shard.dim} but the model expects "
                             f"{model.dim}")
        own = shard.read_class_table()
        if own is not None and class_table_sha256(own) != digest:
            raise InputError(f"{shard.path} carries another class table than the classes given "
                             f"({own.shape[0]} vs {table.shape[0]} classes, other values)")
    total = sum(shard.rows for shard in shards)
    if output_format in ("csv", "jsonl") and total * topk > SCORE_TEXT_ENTRIES:
        raise ValueError(f"{output_format} output is for small jobs (rows x topk <= "
                         f"{SCORE_TEXT_ENTRIES:,}); {total:,} rows x {topk} is more: use "
                         "safetensors or npy")
    out = check_output_folder(Path(out), "--out")
    settings = _settings(model, steps, step_size, topk, table, digest, precision, backend,
                         output_format, batch_size)
    job = _claim_folder(out, settings, context)

    by_shard = _parts(shards)
    mine = [part for number, parts in enumerate(by_shard)
            if context.owner(number) == context.rank for part in parts]
    pending = [part for part in mine if _done(out, part, job) is None]
    model = model.to(device).eval()
    table_device = table.to(device)
    bar = tqdm(total=sum(p.stop - p.start for p in pending), unit="rows", unit_scale=True,
               desc="score", disable=None if progress else True, leave=False)
    path = None
    collected: dict[str, list[torch.Tensor]] = {}
    counts = [0, 0]
    for part, (features, labels, ids) in _prefetch(pending, batch_size,
                                                   pin=device.type == "cuda"):
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
        if int(ids.shape[0]) and sum(v.shape[0] for v in collected["row_ids"]) == \
                part.stop - part.start:
            arrays = {name: torch.cat(values) for name, values in collected.items()}
            files = _write_part(out, part, arrays, output_format, names, job)
            record = {"format": PART_FORMAT, "job": job, "input": part.shard.identity(),
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
            record = _done(out, part, job)
            if record is None:
                raise RuntimeError(f"part {part.stem} has no outputs after the job; rerun it")
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
            shards.append({"input": parts[0].shard.identity(), "rows": parts[0].shard.rows,
                           "parts": [{"rows": r["rows"], "files": r["files"]} for r in entries]})
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


