"""The run protocol, one (shots, seed) experiment at a time: extract -> fit the field on the
K-shot train views -> choose M on val -> score test (all classes, or base and new halves).

``fma-fast run`` and :meth:`fma_fast.clip.FewShotClassifier.fit` share it. Under ``torchrun``
(:mod:`fma_fast.core.distributed`) every rank encodes its shards of every job, each job is fitted
whole by one rank (round robin) which chooses its M on val, and every rank then solves its
share of each job's test rows; results come back in job order, so 1 or N processes give the
same answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.distributed import SINGLE, Context
from ..core.metrics import TOP_K_REPORTED, ClassificationCounts, warn_if_collapsed
from ..core.names import Backend, Precision
from ..core.policy import DEFAULT_STEP_SIZE
from ..core.protocol import base_and_new_classes, harmonic_mean
from ..io.features import FeatureSet, check_feature_files, subsample_classes
from ..ops.class_tables import PerRowClasses
from ..solver.api import select_steps
from ..solver.sharded import accuracy_by_steps_sharded, solve_sharded
from ..train.fit import FitResult
from .cache import ExtractedFeatures

FitField = Callable[..., FitResult]
"""``fit_field(train, class_features, *, seed, device) -> FitResult``: the velocity field's
training on a job's train split (``train`` a FeatureSet of V views per image)."""

RefineField = Callable[..., FitResult]
"""``refine_field(model, train, class_features, *, steps, seed, device) -> FitResult``: the
fitted field refined at the M chosen on val (:func:`fma_fast.refine`)."""


@dataclass(frozen=True)
class SolveSettings:
    """How M is chosen and test rows are solved: the largest M tried, the Euler step and the
    solver's precision and backend (:func:`fma_fast.solve`)."""

    max_steps: int = 10
    step_size: float = DEFAULT_STEP_SIZE
    precision: Precision = "fp32"
    backend: Backend = "auto"


@dataclass
class Job:
    """One fit: its shot count and seed, and (on the rank that fits it) its train/val rows."""

    shots: int
    seed: int
    train: FeatureSet | None = None
    val: FeatureSet | None = None
    base: list[int] | None = None  # base-to-new: the base and new class indices
    new: list[int] | None = None
    untrained: list[int] | None = None  # base classes without training images

    @property
    def key(self) -> str:
        return f"k{self.shots}-seed{self.seed}"


def prepare_job(job: Job, features: ExtractedFeatures, subsample: str) -> None:
    """Check that the splits go together and keep the rows the fit sees (the base classes'
    for base-to-new)."""
    train, val = features.train, features.val
    splits = {"train": train, "val": val}
    if features.test is not None:
        splits["test"] = features.test
    check_feature_files(splits)
    if subsample == "base-to-new":
        job.base, job.new = base_and_new_classes(train.class_features.shape[0])
        _check_halves(job, train, features.test)
        train = subsample_classes(train, job.base, "base")
        val = subsample_classes(val, job.base, "base")
    job.train, job.val = train, val


def _check_halves(job: Job, train: FeatureSet, test: FeatureSet | None) -> None:
    """Before any fit: the base half has training images and each half has test images (when
    there is a test split). A class without training images (``--allow-empty-classes``)
    stays in its half; base ones are recorded (the field never trained on them, as on new
    classes)."""
    trained = set(train.labels.tolist())
    job.untrained = [c for c in job.base if c not in trained]
    if len(job.untrained) == len(job.base):
        raise ValueError(f"base-to-new: none of the {len(job.base)} base classes (the first "
                         "ceil(C/2)) has training images; nothing to train on")
    if test is None:
        return
    tested = set(test.labels.tolist())
    for name, classes in (("base", job.base), ("new", job.new)):
        if not tested & set(classes):
            raise ValueError(f"base-to-new: none of the {len(classes)} {name} classes has test "
                             "images; its accuracy would be undefined")


def class_tables(encoder, split: FeatureSet, classes: list[int] | None):
    """What a split is scored against: its class table, or CoCoOp's per-image tables (of
    ``classes``, the base or new half, when given)."""
    if getattr(encoder, "per_image", False):
        return encoder.per_image_tables(classes)
    return split.class_features


def fit_job(job: Job, fit_field: FitField, solve: SolveSettings, device, encoder,
            rank: int = 0, refine_field: RefineField | None = None) -> dict[str, Any]:
    """Fit one job and choose its M on val, on this rank alone; with ``refine_field`` the
    field is then refined at that M (nothing to refine at M=0) and M chosen again."""
    train, val = job.train, job.val
    start = time.perf_counter()
    fitted = fit_field(train, class_tables(encoder, train, job.base), seed=job.seed,
                       device=str(device))
    seconds = time.perf_counter() - start

    def choose(model):
        return select_steps(
            model, val.features, val.labels, class_tables(encoder, val, job.base),
            solve.max_steps, solve.step_size, device=device, precision=solve.precision,
            backend=solve.backend,
        )

    model, selection = fitted.model, choose(fitted.model)
    refinement = None
    if refine_field is not None and selection.best_steps:
        refined = refine_field(fitted.model, train, class_tables(encoder, train, job.base),
                               steps=selection.best_steps, seed=job.seed, device=str(device))
        refinement = {**refined.config, "history": refined.history,
                      "steps_before": selection.best_steps}
        model, selection = refined.model, choose(refined.model)
        seconds = time.perf_counter() - start
    return {
        "model": model.to("cpu"),
        "history": fitted.history,
        "config": fitted.config,
        "seconds": seconds,
        "selection": selection,
        "val_rows": int(val.features.shape[0]),
        "rank": rank,
        "refinement": refinement,
    }


def class_count(table) -> int:
    """C of a class table or of CoCoOp's per-image tables."""
    return table.num_classes if isinstance(table, PerRowClasses) else table.shape[0]


def _test(solve: SolveSettings, model, steps: int, test: FeatureSet, table, device, context):
    """Accuracy per M over the test rows and the predictions at ``steps``, rows shared out."""
    solve_options = {"precision": solve.precision, "backend": solve.backend,
                     "step_size": solve.step_size, "device": device, "context": context}
    curve = accuracy_by_steps_sharded(model, test.features, test.labels, table,
                                      max_steps=solve.max_steps, **solve_options)
    result = solve_sharded(test.features, model, steps, class_features=table,
                           topk=min(TOP_K_REPORTED, class_count(table)), **solve_options)
    return curve, result


def _test_sets(subsample: str, job: Job, test: FeatureSet):
    """(test split, the classes its table keeps or None) by name ("" without subsampling)."""
    if subsample == "base-to-new":
        return {"base": (subsample_classes(test, job.base, "base"), job.base),
                "new": (subsample_classes(test, job.new, "new"), job.new)}
    return {"": (test, None)}


def evaluate_job(job: Job, fitted: dict[str, Any], test: FeatureSet, encoder, device,
                 context: Context, solve: SolveSettings, subsample: str):
    """The run record of one fitted job and its test predictions (name -> tensor)."""
    model, selection = fitted["model"], fitted["selection"]
    best, config = selection.best_steps, fitted["config"]
    run: dict[str, Any] = {
        "shots": job.shots,
        "seed": job.seed,
        "chosen_steps": best,
        "val_accuracy": selection.accuracy,
        "val_cross_entropy": selection.cross_entropy,
    }
    predictions, prefix = {}, job.key
    for name, (split, classes) in _test_sets(subsample, job, test).items():
        table = class_tables(encoder, split, classes)
        curve, result = _test(solve, model, best, split, table, device, context)
        key = f"{name}_test" if name else "test"
        run[f"{key}_accuracy"] = curve
        run[f"{key}_rows"] = int(split.features.shape[0])
        run[f"{key}_at_chosen_m"] = ClassificationCounts.of(
            result.topk_indices, split.labels).summary(split.class_names)
        warn_if_collapsed(result.pred, class_count(table), f"{job.key} {key}", split.class_names)
        run["solve_path"] = result.path
        predictions[f"{prefix}-{name}" if name else prefix] = result.pred
        predictions[f"labels-{name}" if name else "labels"] = split.labels
    if subsample == "base-to-new":
        run["hm_by_steps"] = [harmonic_mean(b, n) for b, n in
                              zip(run["base_test_accuracy"], run["new_test_accuracy"])]
        run["classes"] = {"base": job.base, "new": job.new}
        if job.untrained:
            run["classes"]["base_without_shots"] = job.untrained
    run.update(
        train_rows=config["rows"],
        train_images=config["images"],
        views=config["views"],
        val_rows=fitted["val_rows"],
        optimizer_steps=config["optimizer_steps"],
        warmup_steps=config["warmup_steps"],
        fit_seconds=round(fitted["seconds"], 3),
        refinement=fitted["refinement"],
        fitted_on_rank=fitted["rank"],
        loss_first_last=[fitted["history"][0], fitted["history"][-1]],
    )
    return run, predictions


@dataclass
class RunOutcome:
    """The jobs, every job's run record (job order), the test predictions by name, each job's
    fitted field and selection (``fitted[i]`` for ``jobs[i]``), the test split and the images
    skipped per job."""

    jobs: list[Job]
    runs: list[dict[str, Any]]
    predictions: dict[str, torch.Tensor]
    fitted: list[dict[str, Any]]
    test: FeatureSet
    skipped: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def run_jobs(
    jobs: list[Job],
    *,
    extract_job: Callable[[Job], ExtractedFeatures],
    fit_field: FitField,
    encoder,
    solve: SolveSettings,
    subsample: str = "all",
    device,
    context: Context = SINGLE,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    refine_field: RefineField | None = None,
) -> RunOutcome:
    """The run protocol over ``jobs``: ``extract_job`` encodes a job's splits (every rank, its
    shards), the job's owner fits it and chooses M, every rank scores test. ``on_run`` sees
    each run record on rank 0 as soon as it is done."""
    test, skipped = None, {}
    for number, job in enumerate(jobs):  # every rank encodes its shards of every job
        features = extract_job(job)
        test = features.test if test is None else test  # the same for every job
        skipped[job.key] = features.skipped
        if context.owner(number) == context.rank:
            prepare_job(job, features, subsample)
    fitted = {}
    for number, job in enumerate(jobs):  # each rank fits its own jobs, whole
        if context.owner(number) == context.rank:
            fitted[number] = fit_job(job, fit_field, solve, device, encoder, context.rank,
                                     refine_field)
    runs, predictions, shared_fits = [], {}, []
    for number, job in enumerate(jobs):
        owner = context.owner(number)
        mine = fitted.get(number)
        shared = context.broadcast(
            None if mine is None else {**mine, "classes": (job.base, job.new, job.untrained)},
            src=owner,
        )
        job.base, job.new, job.untrained = shared.pop("classes")
        run, preds = evaluate_job(job, shared, test, encoder, device, context, solve, subsample)
        runs.append(run)
        shared_fits.append(shared)
        predictions.update(preds)
        if context.is_main and on_run is not None:
            on_run(run)
    return RunOutcome(jobs, runs, predictions, shared_fits, test, skipped)
