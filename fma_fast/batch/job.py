"""Batch scoring of test sets of any size: :func:`score` streams the rows of its inputs from disk
a chunk at a time, solves them, and writes top-k outputs per input shard.

Work is cut into parts (an input shard's rows, at most ``policy.SCORE_PART_ROWS`` at a time,
fewer with a large top-k: ``policy.SCORE_PART_BYTES``). A part's outputs are written atomically
and then its record (``*.done.json``: the job, the input, a sha256 of the bytes the part read,
fed as they were read, and the output files' sha256). Each input is read through one open
handle, checked before and after every part to be the file that was planned (device, inode,
size, modification and change times): a file rewritten or replaced while it is read stops the
job, and its part is not recorded (where the change time alone differs, as chmod or a new hard
link make it, what was read is read again and stops the job only if it differs). A rerun skips
exactly the parts whose record matches, the input's bytes hashed again (a read, no solve), so a
job killed at any moment and run again scores every row once, and an input replaced by other
bytes of the same size and mtime (``cp -p``, ``rsync -a``) is scored again. The folder's
``job.json``, created atomically after every option was resolved, ties it to one job's
settings: another job there is refused. A reader thread prefetches the next chunk while the
current one is solved; memory stays a few chunks and one part's outputs whatever N is. Under
``torchrun`` each rank takes whole input shards and writes its own outputs; rank 0 writes
``manifest.json`` from the part records.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..core import validation as check
from ..core.distributed import SINGLE, Context
from ..core.metrics import (
    TOP_K_REPORTED,
    ClassificationCounts,
    CollapseWarning,
    collapse_message,
)
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
from ..core.progress import progress as progress_bar
from ..io import checkpoint
from ..io.features import (
    FeatureFileError,
    check_same_origin,
    class_table_difference,
    class_table_sha256,
    load_features,
    table_mismatch,
    unit_rows,
)
from ..io.files import (
    check_output_folder,
    file_problem,
    write_text,
)
from ..io.row_sources import InputError, Shard, find_shards
from ..solver.api import prepare_route, solve
from ..solver.plan import check_plan_fits
from ..solver.routing import SolveOptions, resolve
from .reader import Part, plan_parts, prefetch
from .records import already_done, claim_folder, read_records, remove_stale_parts, write_record
from .writers import FORMATS, write_part

MANIFEST_NAME = "manifest.json"
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
                table = torch.from_numpy(np.load(path))
            except (OSError, ValueError, SyntaxError, RecursionError, MemoryError,
                    TypeError) as error:  # TypeError: a dtype torch has not (uint16, ...)
                raise InputError(f"cannot read --classes {path}: {error}") from None
        else:
            try:
                data = load_features(path)
                table, names = data.class_features, data.class_names
                class_names = names if class_names is None else class_names
            except FeatureFileError as error:
                table = _single_table(path, error)
        name = f"--classes {path}"
    else:
        table, name = check.as_tensor("class_features", classes), "class_features"
    check.check_dense_float(name, table, error=InputError)  # before a cast drops a part of it
    table = check.check_matrix(name, table).float()
    check.check_finite(name, table)
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


def check_route(model: VelocityNet, steps: int, options: SolveOptions) -> None:
    """Every solve option resolved as the solve will resolve it, before a job claims its
    folder: an option refused late (or a compiled backend that cannot build) would leave
    job.json claiming the folder for a job that cannot run."""
    route = resolve(model, options, steps, torch.device("cpu"))
    if route.network != NETWORK_REFERENCE:
        check_plan_fits(model, steps, PRECISION_DTYPES[options.precision], route.device)
    prepare_route(route, model, steps)  # a compiled backend compiles and checks its steps here


def _part_rows(topk: int) -> int:
    """Rows per part: ``SCORE_PART_ROWS``, fewer when the top-k outputs (12 bytes an entry)
    would pass ``SCORE_PART_BYTES``."""
    return max(1, min(SCORE_PART_ROWS, SCORE_PART_BYTES // (12 * topk)))


@dataclass
class ScoreJob:
    """One scoring job with every option resolved and checked, before anything is written:
    the network with M and h, whether rows are normalised, the class table and its names, the
    solve options, the parts' size and the input shards."""

    model: VelocityNet
    steps: int
    step_size: float
    normalize: bool
    topk: int
    output_format: str
    table: torch.Tensor
    names: list[str] | None
    options: SolveOptions
    part_rows: int
    shards: list[Shard]

    @classmethod
    def resolve(cls, model, inputs, classes, *, steps, step_size, normalize, topk,
                output_format, class_names, device, precision, backend, batch_size,
                context: Context) -> ScoreJob:
        """The job of :func:`score`'s arguments; each is refused with a one-line error naming
        it (the inputs' headers are read, not their rows)."""
        model, steps, step_size, normalize, model_name = _resolve_model(model, steps, step_size,
                                                                        normalize)
        check_choice("output_format", output_format, FORMATS)
        check_choice("precision", precision, PRECISIONS)
        check_choice("backend", backend, BACKENDS)
        topk = check.check_int("topk", topk, minimum=1)
        table, names = _resolve_classes(classes, class_names)
        if normalize:  # as eval normalises a file's rows and class table
            table = unit_rows(table, f"--classes {classes}" if isinstance(
                classes, (str, os.PathLike)) else "class_features")[0]
        if table.shape[1] != model.dim:
            raise ValueError(f"the class table has dim {table.shape[1]} but the model expects "
                             f"{model.dim}")
        if topk > table.shape[0]:
            raise ValueError(f"topk must be <= the number of classes {table.shape[0]}, got "
                             f"{topk}")
        _check_trained_on(model, model_name, table, names)
        device = context.device(device)
        part_rows = _part_rows(topk)
        batch_size = check.check_int("batch_size", batch_size if batch_size is not None
                                     else SOLVE_BATCH_ROWS.get(device.type, 4096), minimum=1)
        options = SolveOptions(step_size=step_size, precision=precision, backend=backend,
                               batch_size=min(batch_size, part_rows), device=device)
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        job = cls(model, steps, step_size, normalize, topk, output_format, table, names,
                  options, part_rows, find_shards(list(inputs)))
        job._check_inputs()
        if isinstance(model.trained_on, dict):  # eval's rule, on every shard
            check_same_origin({f"the data {model_name} was trained on": model.trained_on,
                               **{f"input {shard.path}": {"source": shard.source}
                                  for shard in job.shards}})
        return job

    def _check_inputs(self) -> None:
        """Every shard's rows fit the model, its class table (if it has one) is the one given
        and its labels lie in it; text outputs stay small."""
        model, table, classes = self.model, self.table, int(self.table.shape[0])
        for shard in self.shards:
            if shard.dim != model.dim:
                raise InputError(f"{shard.path}: rows have dim {shard.dim} but the model "
                                 f"expects {model.dim}")
            own = shard.read_class_table()
            if own is not None and self.normalize:
                own = unit_rows(own, f"{shard.path} class_features")[0]
            difference = None if own is None else class_table_difference(own, table)
            if difference:
                raise InputError(f"{shard.path} carries another class table than the classes "
                                 f"given ({own.shape[0]} vs {table.shape[0]} classes: "
                                 f"{difference})")
            found = shard.label_range()
            if found is not None and (found[0] < 0 or found[1] >= classes):
                raise InputError(f"{shard.path}: labels must lie in [0, {classes}) for the "
                                 f"{classes} classes given, got values in [{found[0]}, "
                                 f"{found[1]}]")
        total = sum(shard.rows for shard in self.shards)
        if self.output_format in ("csv", "jsonl") and total * self.topk > SCORE_TEXT_ENTRIES:
            raise ValueError(f"{self.output_format} output is for small jobs (rows x topk <= "
                             f"{SCORE_TEXT_ENTRIES:,}); {total:,} rows x {self.topk} is more: "
                             "use safetensors or npy")

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def batch_rows(self) -> int:
        return self.options.batch_size

    def check_route(self) -> None:
        """Every option resolved as the solve will resolve it, before the folder is claimed."""
        check_route(self.model, self.steps, self.options)

    def settings(self) -> dict[str, Any]:
        """What ``job.json`` ties the output folder to (a rerun must match it)."""
        return {
            "model_sha256": weights_sha256(self.model),
            "steps": self.steps,
            "step_size": self.step_size,
            "normalize": self.normalize,
            "topk": self.topk,
            "classes": int(self.table.shape[0]),
            "class_table_sha256": class_table_sha256(self.table),
            "precision": self.options.precision,
            "backend": self.options.backend,
            "format": self.output_format,
            "batch_rows": self.batch_rows,
            "part_rows": self.part_rows,
        }


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

    Args:
        model: a :class:`VelocityNet` or a model folder.
        inputs: feature files, cache folders or ``.npy`` arrays (one path or several).
        classes: the class table or a feature file holding it.
        out: the output folder (created; a rerun resumes it).
        steps, step_size, normalize: the solve settings (None: the model's).
        topk, output_format, class_names: what each part holds and how it is written.
        device, precision, backend, batch_size: as for :func:`~fma_fast.solve`.
        progress: a progress bar on a terminal.

    Returns:
        A :class:`ScoreSummary` (rows, rows scored, parts skipped, rows/s, accuracy at M and
        M=0 when labelled, the manifest).
    """
    started = time.perf_counter()
    job = ScoreJob.resolve(
        model, inputs, classes, steps=steps, step_size=step_size, normalize=normalize,
        topk=topk, output_format=output_format, class_names=class_names, device=device,
        precision=precision, backend=backend, batch_size=batch_size, context=context,
    )
    out = check_output_folder(Path(out), "--out")
    job.model = job.model.to(job.device).eval()
    job.check_route()
    settings = job.settings()
    digest = claim_folder(out, settings, context)
    by_shard = plan_parts(job.shards, job.part_rows)
    mine_by_shard = [shard_parts for number, shard_parts in enumerate(by_shard)
                     if context.owner(number) == context.rank]
    remove_stale_parts(out, by_shard, mine_by_shard, context)
    mine = [part for shard_parts in mine_by_shard for part in shard_parts]
    done = already_done(out, mine, digest, job.batch_rows)
    pending = [part for number, part in enumerate(mine) if number not in done]
    path = _score_parts(job, out, pending, digest, progress)
    context.barrier()
    seconds = time.perf_counter() - started
    scored = sum(p.stop - p.start for p in pending)
    return _manifest(out, by_shard, job, digest, settings, context,
                     (scored, len(mine) - len(pending)), seconds, path)


def _score_parts(job: ScoreJob, out: Path, pending: list[Part], digest: str,
                 progress: bool) -> str | None:
    """Solve the rows of ``pending`` chunk by chunk as the reader thread delivers them; write
    each part's outputs and then its record. Returns the solver path that ran."""
    table = job.table.to(job.device)
    bar = progress_bar(total=sum(p.stop - p.start for p in pending), unit="rows", desc="score",
                       enabled=progress)
    path = None
    collected: dict[str, list[torch.Tensor]] = {}
    correct_m0, metrics, predicted = 0, ClassificationCounts(), _Predicted()
    offset = 0  # of the chunk in its part
    wide = max(job.topk, min(TOP_K_REPORTED, table.shape[0]))  # top-5 accuracy when labelled
    for part, (features, labels, ids), input_digest in prefetch(
            pending, job.batch_rows, pin=job.device.type == "cuda"):
        if job.normalize:
            features = unit_rows(features, f"input {part.shard.path}", part.start + offset)[0]
        offset += features.shape[0]
        result = solve(features.to(job.device, non_blocking=True), job.model, job.steps,
                       step_size=job.step_size, class_features=table,
                       topk=wide if labels is not None else job.topk,
                       batch_size=job.batch_rows, device=job.device,
                       precision=job.options.precision, backend=job.options.backend,
                       zero_shot=labels is not None)
        path = result.path
        chunk = {"topk_indices": result.topk_indices[:, :job.topk].cpu(),
                 "topk_values": result.topk_values[:, :job.topk].cpu(), "row_ids": ids}
        predicted.add(result.pred)
        if labels is not None:
            chunk["labels"] = labels
            correct_m0 += int((result.zero_shot_pred.cpu() == labels).sum())
            metrics = metrics + ClassificationCounts.of(result.topk_indices, labels)
        for name, value in chunk.items():
            collected.setdefault(name, []).append(value)
        bar.update(features.shape[0])
        if input_digest is not None:
            arrays = {name: torch.cat(values) for name, values in collected.items()}
            files = write_part(out, part, arrays, job.output_format, job.names, digest)
            write_record(out, part, digest, input_digest, files, labelled="labels" in arrays,
                         correct_m0=correct_m0, path=path,
                         metrics=metrics.record(), predicted=predicted.record())
            collected, correct_m0, offset = {}, 0, 0
            metrics, predicted = ClassificationCounts(), _Predicted()
    bar.close()
    return path


class _Predicted:
    """Whether a part's top-1 predictions are all one class: what the job needs to warn
    when every prediction of every part is the same class."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.uniform = True

    def add(self, pred: torch.Tensor) -> None:
        if not pred.numel():
            return
        if self.first is None:
            self.first = int(pred[0])
        self.uniform = self.uniform and bool((pred == self.first).all())

    def record(self) -> list:
        return [self.first, self.uniform]


def _manifest(out, by_shard, score_job: ScoreJob, job: str, settings, context, work, seconds,
              path) -> ScoreSummary:
    """Every part's record read back (all ranks' parts), the summary, and on rank 0 the
    manifest. rows/s: the rows scored by every rank over the slowest rank's wall time."""
    records = read_records(out, by_shard, job)
    rows = sum(p.stop - p.start for p, _ in records)
    labelled = [(p, r) for p, r in records if r["labelled"]]
    labelled_rows = sum(p.stop - p.start for p, _ in labelled)
    accuracy = m0 = None
    wider: dict[str, Any] = {}
    if labelled_rows:
        m0 = sum(r["correct_m0"] for _, r in labelled) / labelled_rows
        total = sum((ClassificationCounts.from_record(r["metrics"]) for _, r in labelled),
                    ClassificationCounts())
        wider = total.summary(score_job.names)
        accuracy = wider.pop("accuracy")
    kinds = {tuple(r["predicted"]) for _, r in records}
    if len(kinds) == 1 and next(iter(kinds))[1]:  # one class in every part
        message = collapse_message(rows, score_job.table.shape[0], next(iter(kinds))[0],
                                   f"score {out}", score_job.names)
        if message is not None:
            warnings.warn(message, CollapseWarning, stacklevel=2)
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
            **wider,
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
