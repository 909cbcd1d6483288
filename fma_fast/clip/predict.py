"""``fma-fast predict`` as a library call: :func:`predict_images` classifies the images of
folders, lists or CSVs with a :class:`~fma_fast.clip.FewShotClassifier` in a resumable batch
job, the job of :func:`fma_fast.score` (:mod:`fma_fast.batch`) with images for rows.

The images of each input are cut into parts of ``part_images``; a part's outputs (top-k
classes and cosines, the image paths, the labels when the input has them) are written
atomically, then its record, whose input digest covers every image's listed path, label and
file bytes (:mod:`fma_fast.clip.images`). A rerun skips the parts whose record holds (the files
hashed again, not decoded); ``job.json`` ties the folder to the classifier's identity and the
options, so another classifier is refused. Three stages overlap: a pool of decoding threads,
the encoder and the solve, joined by bounded queues (memory: a few batches of pixels). Under
``torchrun`` the parts are dealt to the ranks round-robin; rank 0 writes ``manifest.json``.
Images that cannot be read or decoded are skipped and listed (path and reason) in their part's
record and the manifest, or stop the job (``on_bad_image="fail"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..batch.job import check_route
from ..batch.reader import Part, plan_parts, threaded
from ..batch.records import (
    already_done,
    claim_folder,
    read_record,
    read_records,
    remove_stale_parts,
    write_record,
)
from ..batch.writers import FORMATS, write_part
from ..core import validation as check
from ..core.distributed import SINGLE, Context
from ..core.metrics import (
    TOP_K_REPORTED,
    ClassificationCounts,
    CollapseWarning,
    collapse_message,
)
from ..core.names import Backend, Precision, check_choice
from ..core.policy import DECODE_THREADS, PREDICT_PART_IMAGES, SCORE_TEXT_ENTRIES
from ..core.progress import progress as progress_bar
from ..io.files import check_output_folder, write_text
from ..io.row_sources import InputError
from ..solver.routing import SolveOptions
from .cache import ON_ERROR
from .classifier import ENCODE_BATCH, FewShotClassifier
from .images import Decoded, ImageSource, decode, entries_digest, find_images, rehash
from .transforms import require_image_libraries

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fma_fast/predict-manifest/1"
JOB_KIND = "fma_fast/predict"


@dataclass
class PredictSummary:
    """What :func:`predict_images` did: images listed, rows predicted (images decoded), those
    classified by this call, parts, undecodable images (path, reason), wall time and images/s
    of this call, and over the labelled rows the top-1 and top-5 accuracy, the top-1 at M=0
    and the mean per-class recall (fractions; None without labels; "top-5" is top-min(5, C):
    ``top5_classes``); the one class every
    prediction fell in (``collapsed``, else None), the solver path and the manifest."""

    out: Path
    images: int
    rows: int
    images_done: int
    parts: int
    parts_skipped: int
    bad_images: list[list[str]]
    seconds: float
    images_per_s: float
    labelled_rows: int
    top5_classes: int
    accuracy: float | None
    top5_accuracy: float | None
    accuracy_at_m0: float | None
    mean_per_class_recall: float | None
    collapsed: str | None
    path: str | None
    manifest: Path

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        done = (f"predicted {self.images_done:,} of {self.images:,} images in "
                f"{self.seconds:.1f} s ({self.images_per_s:,.1f} images/s)")
        if self.parts_skipped:
            done += f", {self.parts_skipped} of {self.parts} parts already done"
        if self.bad_images:
            done += f"; {len(self.bad_images)} undecodable image(s) skipped"
        accuracy = ""
        if self.accuracy is not None:
            accuracy = (f"; {self.labelled_rows:,} labelled: accuracy "
                        f"{100 * self.accuracy:.2f}% (top-{self.top5_classes} "
                        f"{100 * self.top5_accuracy:.2f}%, "
                        f"M=0 {100 * self.accuracy_at_m0:.2f}%, mean per-class recall "
                        f"{100 * self.mean_per_class_recall:.2f}%)")
        return f"{done}{accuracy}; manifest {self.manifest}"


@dataclass
class _Batch:
    """Images ``first:first + len(decoded)`` of a part's input, decoded."""

    part: Part
    first: int
    decoded: list[Decoded]

    @property
    def last(self) -> bool:
        return self.first + len(self.decoded) == self.part.stop


@dataclass
class _PartState:
    """A part's outputs and counts while its batches are solved."""

    classes: int
    labelled: bool
    arrays: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bad: list[list[str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: ClassificationCounts = field(default_factory=ClassificationCounts)

    def __post_init__(self) -> None:
        self.counts = {"correct_m0": 0, "predicted": [0] * self.classes}

    def add(self, result, rows: torch.Tensor, labels: torch.Tensor | None, topk: int) -> None:
        indices, values = result.topk_indices.cpu(), result.topk_values.cpu()
        chunk = {"topk_indices": indices[:, :topk].contiguous(),
                 "topk_values": values[:, :topk].contiguous(), "row_ids": rows}
        top1 = indices[:, 0]
        self._count("predicted", top1)
        if labels is not None:
            chunk["labels"] = labels
            self.metrics = self.metrics + ClassificationCounts.of(indices, labels)
            self.counts["correct_m0"] += int((result.zero_shot_pred.cpu() == labels).sum())
        for name, value in chunk.items():
            self.arrays.setdefault(name, []).append(value)

    def _count(self, key: str, classes: torch.Tensor) -> None:
        found = torch.bincount(classes, minlength=self.classes).tolist()
        self.counts[key] = [a + b for a, b in zip(self.counts[key], found)]

    def outputs(self, topk: int) -> dict[str, torch.Tensor]:
        if self.arrays:
            return {name: torch.cat(values) for name, values in self.arrays.items()}
        empty = {"topk_indices": torch.empty(0, topk, dtype=torch.int64),
                 "topk_values": torch.empty(0, topk), "row_ids": torch.empty(0, dtype=torch.int64)}
        if self.labelled:
            empty["labels"] = torch.empty(0, dtype=torch.int64)
        return empty


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _threads(workers: int | None) -> int:
    if workers is None:
        return max(1, min(DECODE_THREADS, os.cpu_count() or 1))
    return check.check_int("workers", workers, minimum=1)


def predict_images(
    classifier: FewShotClassifier | str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    topk: int = 1,
    output_format: str = "safetensors",
    on_bad_image: str = "skip",
    encode_batch_size: int = ENCODE_BATCH,
    part_images: int = PREDICT_PART_IMAGES,
    workers: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision | None = None,
    backend: Backend | None = None,
    progress: bool = True,
    context: Context = SINGLE,
) -> PredictSummary:
    """Classify every image of ``inputs`` and write the top-``topk`` classes under ``out``.

    ``classifier``: a :class:`FewShotClassifier` or its folder (loaded on ``device``).
    ``inputs``: folders of images (recursive; labelled when every image is in a first-level
    folder named after a class), ``.txt`` lists of paths or ``.csv`` files with a ``path`` and
    an optional ``label`` (class name) column; relative paths are relative to the list. Per
    part: ``topk_indices``, ``topk_values`` (cosines), ``row_ids`` (the image's place in its
    input), ``labels`` when labelled, and the image paths, as ``output_format``;
    ``manifest.json`` sums the job up (labelled inputs: accuracy, top-5 accuracy, M=0
    accuracy and per-class recall). ``on_bad_image``: "skip" an undecodable image (listed in
    the manifest) or "fail". ``encode_batch_size`` images are decoded and encoded at a time
    by ``workers`` decoding threads (None: up to ``policy.DECODE_THREADS``); ``part_images``
    images make a part. ``precision``/``backend``: the solver's (None: as fitted). Resumable:
    see the module docstring.
    """
    started = time.perf_counter()
    check_choice("output_format", output_format, FORMATS)
    check_choice("on_bad_image", on_bad_image, ON_ERROR)
    topk = check.check_int("topk", topk, minimum=1)
    encode_batch_size = check.check_int("encode_batch_size", encode_batch_size, minimum=1)
    part_images = check.check_int("part_images", part_images, minimum=1)
    threads = _threads(workers)
    if isinstance(classifier, (str, os.PathLike)):
        classifier = FewShotClassifier.load(classifier, device=context.device(device))
    if not isinstance(classifier, FewShotClassifier):
        raise TypeError(f"classifier must be a FewShotClassifier or its folder, got "
                        f"{type(classifier).__name__}")
    classes = len(classifier.class_names)
    if topk > classes:
        raise ValueError(f"topk must be <= the classifier's {classes} classes, got {topk}")
    sources = find_images(inputs, classifier.class_names)
    total = sum(source.rows for source in sources)
    if output_format in ("csv", "jsonl") and total * topk > SCORE_TEXT_ENTRIES:
        raise ValueError(f"{output_format} output is for small jobs (images x topk <= "
                         f"{SCORE_TEXT_ENTRIES:,}); {total:,} images x {topk} is more: use "
                         "safetensors or npy")
    options = SolveOptions(step_size=classifier.step_size,
                           precision=precision or classifier.precision,
                           backend=backend or classifier.backend,
                           device=next(classifier.field.parameters()).device)
    check_route(classifier.field, classifier.steps, options)
    require_image_libraries()
    out = check_output_folder(Path(out), "--out")
    identity = classifier.identity()
    settings = {"kind": JOB_KIND, "classifier_sha256": _digest(identity), "classifier": identity,
                "topk": topk, "format": output_format, "precision": options.precision,
                "backend": options.backend, "encode_batch": encode_batch_size,
                "part_images": part_images}
    digest = claim_folder(out, settings, context)
    by_source = plan_parts(sources, part_images)
    numbered = [part for parts in by_source for part in parts]
    mine = [part for number, part in enumerate(numbered) if context.owner(number) == context.rank]
    if context.is_main:
        remove_stale_parts(out, by_source, by_source, context)  # every input: parts are dealt
    context.barrier()
    done = already_done(out, mine, digest, encode_batch_size,
                        rehash=lambda part: rehash(part.shard, part.start, part.stop))
    if on_bad_image == "fail":
        _refuse_recorded_bad(out, [mine[n] for n in sorted(done)], digest)
    pending = [part for number, part in enumerate(mine) if number not in done]
    job = _Job(classifier, options, topk, output_format, on_bad_image, encode_batch_size,
               threads, digest, out)
    path = job.run(pending, progress and context.is_main)
    context.barrier()
    seconds = time.perf_counter() - started
    return _manifest(out, by_source, digest, settings, classifier, context,
                     (sum(p.stop - p.start for p in pending), len(done)), seconds, path)


def _refuse_recorded_bad(out: Path, parts: list[Part], digest: str) -> None:
    for part in parts:
        bad = (read_record(out, part, digest) or {}).get("bad") or []
        if bad:
            raise InputError(_bad_message(*bad[0], earlier=True))


def _bad_message(path: str, problem: str, earlier: bool = False) -> str:
    when = " (skipped by an earlier run into this folder)" if earlier else ""
    return (f"cannot decode image {path}{when}: {problem}; fix or remove it, or pass "
            "--on-bad-image skip (on_bad_image='skip') to skip undecodable images")


@dataclass
class _Job:
    """The pending parts' pipeline: decode (a thread pool) -> encode -> solve and write."""

    classifier: FewShotClassifier
    options: SolveOptions
    topk: int
    output_format: str
    on_bad_image: str
    batch: int
    threads: int
    digest: str
    out: Path

    def _decoded(self, parts: list[Part]) -> Iterator[_Batch]:
        """Batches of decoded images, never across a part (a part's batches, and so its
        bytes, are the same whichever rank or run computes it)."""
        preprocess = self.classifier.preprocess
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fma-fast-decode") as pool:
            for part in parts:
                entries = part.shard.entries
                for first in range(part.start, part.stop, self.batch):
                    chunk = entries[first:min(first + self.batch, part.stop)]
                    yield _Batch(part, first, list(pool.map(lambda e: decode(e, preprocess),
                                                            chunk)))

    def _encoded(self, batches: Iterator[_Batch]
                 ) -> Iterator[tuple[_Batch, list[int], torch.Tensor | None]]:
        """Each batch with the positions of its decoded images and their features."""
        try:
            for batch in batches:
                kept = [i for i, d in enumerate(batch.decoded) if d.pixels is not None]
                if self.on_bad_image == "fail" and len(kept) < len(batch.decoded):
                    bad = next(i for i, d in enumerate(batch.decoded) if d.pixels is None)
                    entry = batch.part.shard.entries[batch.first + bad]
                    raise InputError(_bad_message(entry.shown, batch.decoded[bad].problem))
                features = None
                if kept:
                    pixels = torch.stack([batch.decoded[i].pixels for i in kept])
                    features = self.classifier.encoder.encode_images(pixels)
                yield batch, kept, features
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def run(self, pending: list[Part], progress: bool) -> str | None:
        """Classify ``pending``; write each part's outputs and then its record. Returns the
        solver path that ran."""
        classes = len(self.classifier.class_names)
        bar = progress_bar(total=sum(p.stop - p.start for p in pending), desc="predict",
                           unit="images", enabled=progress)
        path, state = None, None
        stages = threaded(self._encoded(threaded(self._decoded(pending), "decode")), "encode")
        try:
            for batch, kept, features in stages:
                part, source = batch.part, batch.part.shard
                if batch.first == part.start:
                    state = _PartState(classes, source.labelled)
                entries = source.entries[batch.first:batch.first + len(batch.decoded)]
                state.files += [d.file_digest for d in batch.decoded]
                state.bad += [[e.shown, d.problem] for e, d in zip(entries, batch.decoded)
                              if d.pixels is None]
                if features is not None:
                    path = self._solve(state, features, [entries[i] for i in kept],
                                       [batch.first + i for i in kept])
                bar.update(len(batch.decoded))
                if batch.last:
                    self._write(part, state, path)
        finally:  # a failed write stops the stage threads now, not when garbage-collected
            stages.close()
            bar.close()
        return path

    def _solve(self, state: _PartState, features: torch.Tensor, entries, rows) -> str:
        labels = None
        if state.labelled:
            labels = torch.tensor([e.label for e in entries], dtype=torch.int64)
        wide = max(self.topk, min(TOP_K_REPORTED, state.classes)) if state.labelled else self.topk
        result = self.classifier.solve(features, topk=wide, zero_shot=state.labelled,
                                       device=self.options.device,
                                       precision=self.options.precision,
                                       backend=self.options.backend)
        state.add(result, torch.tensor(rows, dtype=torch.int64), labels, self.topk)
        state.paths += [e.shown for e in entries]
        return result.path

    def _write(self, part: Part, state: _PartState, path: str | None) -> None:
        source: ImageSource = part.shard
        files = write_part(self.out, part, state.outputs(self.topk), self.output_format,
                           self.classifier.class_names, self.digest, paths=state.paths)
        input_digest = entries_digest(source.entries[part.start:part.stop], state.files)
        write_record(self.out, part, self.digest, input_digest, files, labelled=state.labelled,
                     kept=len(state.paths), bad=state.bad, path=path,
                     metrics=state.metrics.record(), **state.counts)


def _sum_lists(lists: list[list[int]], size: int) -> list[int]:
    total = [0] * size
    for values in lists:
        total = [a + b for a, b in zip(total, values)]
    return total


def _manifest(out, by_source, digest, settings, classifier, context, work, seconds,
              path) -> PredictSummary:
    """Every part's record read back, the summary, the collapse warning, and on rank 0 the
    manifest. images/s: the images done by every rank over the slowest rank's wall time."""
    names = classifier.class_names
    records = read_records(out, by_source, digest)
    images = sum(p.stop - p.start for p, _ in records)
    rows = sum(r["kept"] for _, r in records)
    bad = [entry for _, r in records for entry in r["bad"]]
    labelled = [r for _, r in records if r["labelled"]]
    labelled_rows = sum(r["kept"] for r in labelled)
    predicted = _sum_lists([r["predicted"] for _, r in records], len(names))
    found = sum((ClassificationCounts.from_record(r["metrics"]) for r in labelled),
                ClassificationCounts()).summary(names)
    recall = {name: found.get("per_class_recall", {}).get(name) for name in names}
    scores: dict[str, float | None] = {
        key: found.get(key) for key in ("accuracy", "top5_accuracy", "mean_per_class_recall")}
    scores["accuracy_at_m0"] = (sum(r["correct_m0"] for r in labelled) / labelled_rows
                                if labelled_rows else None)
    warning = None
    if rows and max(predicted) == rows:  # every prediction in one class
        warning = collapse_message(rows, len(names), predicted.index(rows), "", names)
    path = path or next((r.get("path") for _, r in records if r.get("path")), None)
    gathered = context.gather((*work, seconds))
    done_all, skipped = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
    slowest = max(g[2] for g in gathered)
    summary = PredictSummary(
        out=out, images=images, rows=rows, images_done=done_all, parts=len(records),
        parts_skipped=skipped, bad_images=bad, seconds=slowest,
        images_per_s=done_all / slowest if slowest > 0 else 0.0, labelled_rows=labelled_rows,
        top5_classes=min(TOP_K_REPORTED, len(names)),
        collapsed=None if warning is None else names[predicted.index(rows)], path=path,
        manifest=out / MANIFEST_NAME, **scores)
    if context.is_main:
        inputs = []
        for parts in by_source:
            entries = [r for p, r in records if p.shard is parts[0].shard]
            inputs.append({"input": parts[0].shard.record(),
                           "parts": [{"images": r["rows"][1] - r["rows"][0], "rows": r["kept"],
                                      "input_sha256": r["input"]["sha256"], "files": r["files"]}
                                     for r in entries]})
        manifest = {
            "format": MANIFEST_FORMAT, "job": digest, "settings": settings, "images": images,
            "rows": rows, "bad_images": len(bad), "bad": bad, "labelled_rows": labelled_rows,
            **scores, "top5_classes": summary.top5_classes,
            "per_class_recall": recall if labelled_rows else None,
            "predicted_by_class": dict(zip(names, predicted)), "collapsed": summary.collapsed,
            "class_names": names, "path": path,
            "this_run": {"images_done": done_all, "wall_s": round(slowest, 3),
                         "images_per_s": round(summary.images_per_s, 1),
                         "processes": context.world_size,
                         "images_by_rank": [g[0] for g in gathered]},
            "versions": {"fma_fast": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "inputs": inputs,
        }
        write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    context.barrier()
    if warning is not None and context.is_main:
        warnings.warn(warning, CollapseWarning, stacklevel=2)
    return summary
