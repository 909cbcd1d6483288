"""``fma-fast run``: extract -> fit -> choose M on val -> test, for every shot count and seed;
mean ± std tables, and the base-to-new protocol (train on the base half of the classes, test
on base and new).

Scales out under ``torchrun`` (:mod:`fma_fast.distributed`): the encoding is split over
the ranks by shards; the fits are dealt to the ranks whole (one (shots, seed) job each, round
robin), each rank choosing M on val for its own; then every rank solves its share of each
job's test rows. Results are gathered in job order: 1 or N processes give the same answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .._io import save_safetensors, write_text
from ..features_io import FeatureSet, check_feature_files, subsample_classes
from ..protocol import SUBSAMPLES, base_and_new_classes
from ..report import runs as runs_summary
from ..solver import select_steps
from . import clip_options, options

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.safetensors"


def plot_name(shots: int) -> str:
    return f"accuracy_by_steps-k{shots}.png"


@dataclass
class _Job:
    """One fit: its shot count and seed, and (on the rank that fits it) its train/val rows."""

    shots: int
    seed: int
    train: FeatureSet | None = None
    val: FeatureSet | None = None
    base: list[int] | None = None  # base-to-new: the base and new class indices
    new: list[int] | None = None
    untrained: list[int] | None = None  # base classes without training images


def _prepare_job(args, job: _Job, features) -> None:
    train, val = features.train, features.val
    check_feature_files({"train": train, "val": val, "test": features.test})
    if args.subsample == "base-to-new":
        job.base, job.new = base_and_new_classes(train.class_features.shape[0])
        _check_halves(job, train, features.test)
        train = subsample_classes(train, job.base, "base")
        val = subsample_classes(val, job.base, "base")
    job.train, job.val = train, val


def _check_halves(job: _Job, train: FeatureSet, test: FeatureSet) -> None:
    """Before any fit: the base half has training images and each half has test images. A
    class without training images (``--allow-empty-classes``) stays in its half; base ones
    are recorded (the field never trained on them, as on new classes)."""
    trained, tested = set(train.labels.tolist()), set(test.labels.tolist())
    job.untrained = [c for c in job.base if c not in trained]
    if len(job.untrained) == len(job.base):
        raise ValueError(f"base-to-new: none of the {len(job.base)} base classes (the first "
                         "ceil(C/2)) has training images; nothing to train on")
    for name, classes in (("base", job.base), ("new", job.new)):
        if not tested & set(classes):
            raise ValueError(f"base-to-new: none of the {len(classes)} {name} classes has test "
                             "images; its accuracy would be undefined")


def _tables(encoder, split: FeatureSet, classes: list[int] | None):
    """What a split is scored against: its class table, or CoCoOp's per-image tables (of
    ``classes``, the base or new half, when given)."""
    if getattr(encoder, "per_image", False):
        return encoder.per_image_tables(classes)
    return split.class_features


def _fit(args, job: _Job, device, rank: int, encoder) -> dict[str, Any]:
    """Fit one job and choose its M on val, on this rank alone."""
    train, val = job.train, job.val
    start = time.perf_counter()
    fitted = options.fit_from_args(args, train.features, train.labels,
                                   _tables(encoder, train, job.base), seed=job.seed,
                                   device=str(device), views=options.file_views(train, None))
    seconds = time.perf_counter() - start
    selection = select_steps(
        fitted.model, val.features, val.labels, _tables(encoder, val, job.base), args.max_steps,
        args.step_size, device=device, precision=args.solve_precision,
        backend=args.solve_backend,
    )
    return {
        "model": fitted.model.to("cpu"),
        "history": fitted.history,
        "config": fitted.config,
        "seconds": seconds,
        "selection": selection,
        "val_rows": int(val.features.shape[0]),
        "rank": rank,
    }


def _test(args, model, steps: int, test: FeatureSet, table, device, context):
    """Accuracy per M over the test rows and the predictions at ``steps``, rows shared out."""
    from ..clip import accuracy_by_steps_sharded, solve_sharded

    solve_options = {"precision": args.solve_precision, "backend": args.solve_backend,
                     "step_size": args.step_size, "device": device, "context": context}
    curve = accuracy_by_steps_sharded(model, test.features, test.labels, table,
                                      max_steps=args.max_steps, **solve_options)
    result = solve_sharded(test.features, model, steps, class_features=table, **solve_options)
    return curve, result


def _test_sets(args, job: _Job, test: FeatureSet):
    """(test split, the classes its table keeps or None) by name ("" without subsampling)."""
    if args.subsample == "base-to-new":
        return {"base": (subsample_classes(test, job.base, "base"), job.base),
                "new": (subsample_classes(test, job.new, "new"), job.new)}
    return {"": (test, None)}


def _evaluate(args, job: _Job, fitted: dict[str, Any], test: FeatureSet, encoder, device,
              context):
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
    predictions, prefix = {}, f"k{job.shots}-seed{job.seed}"
    for name, (split, classes) in _test_sets(args, job, test).items():
        curve, result = _test(args, model, best, split, _tables(encoder, split, classes),
                              device, context)
        key = f"{name}_test" if name else "test"
        run[f"{key}_accuracy"] = curve
        run[f"{key}_rows"] = int(split.features.shape[0])
        run["solve_path"] = result.path
        predictions[f"{prefix}-{name}" if name else prefix] = result.pred
        predictions[f"labels-{name}" if name else "labels"] = split.labels
    if args.subsample == "base-to-new":
        run["hm_by_steps"] = [runs_summary.harmonic_mean(b, n) for b, n in
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
        fitted_on_rank=fitted["rank"],
        loss_first_last=[fitted["history"][0], fitted["history"][-1]],
    )
    return run, predictions


def _report_line(run: dict[str, Any]) -> str:
    best = run["chosen_steps"]
    head = (f"{run['shots']} shots, seed {run['seed']}: {run['train_images']} train images x "
            f"{run['views']} views, {run['optimizer_steps']} steps, fit {run['fit_seconds']:.1f}"
            f" s on rank {run['fitted_on_rank']}, M={best} chosen on val "
            f"({100 * run['val_accuracy'][best]:.2f}%)")
    if "base_test_accuracy" in run:
        base, new, hm = (run[key][best] for key in
                         ("base_test_accuracy", "new_test_accuracy", "hm_by_steps"))
        zero = [run[key][0] for key in ("base_test_accuracy", "new_test_accuracy", "hm_by_steps")]
        untrained = run["classes"].get("base_without_shots")
        note = f"; base classes without training images: {untrained}" if untrained else ""
        return (f"{head}, base {100 * base:.2f}% new {100 * new:.2f}% HM {100 * hm:.2f}% "
                f"(M=0: {100 * zero[0]:.2f} / {100 * zero[1]:.2f} / {100 * zero[2]:.2f}){note}")
    test = run["test_accuracy"]
    return f"{head}, test {100 * test[best]:.2f}% (M=0: {100 * test[0]:.2f}%)"


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sample std over seeds for one shot count."""
    def stat(values):
        mean, std = runs_summary.percent(values)
        return {"mean": mean, "std": std}

    entry: dict[str, Any] = {"shots": runs[0]["shots"], "seeds": [r["seed"] for r in runs]}
    if "base_test_accuracy" in runs[0]:
        keys = {"base": "base_test_accuracy", "new": "new_test_accuracy", "hm": "hm_by_steps"}
        entry["zero_shot"] = {name: stat([r[key][0] for r in runs]) for name, key in keys.items()}
        entry["fma"] = {name: stat([r[key][r["chosen_steps"]] for r in runs])
                        for name, key in keys.items()}
        entry["hm"] = "2·base·new/(base + new) per seed, then mean ± std"
    else:
        entry["test_at_m0"] = stat([r["test_accuracy"][0] for r in runs])
        entry["test_at_chosen_m"] = stat([r["test_accuracy"][r["chosen_steps"]] for r in runs])
    for key in runs_summary.curves_of(runs).values():
        entry[f"{key.removesuffix('_accuracy')}_by_steps"] = runs_summary.by_steps(runs, key)
    return entry


def _summary_lines(dataset: str, entry: dict[str, Any]) -> str:
    seeds = " ".join(map(str, entry["seeds"]))
    if "fma" in entry:
        rows = [f"{dataset} base-to-new, {entry['shots']} shots, seeds {seeds} "
                "(mean ± sample std, %):",
                f"{'':22}{'base':>15}{'new':>16}{'HM':>16}"]
        for label, key in (("zero-shot (M=0)", "zero_shot"), ("FMA (M on base val)", "fma")):
            cells = "".join(f"  {entry[key][n]['mean']:6.2f} ± {entry[key][n]['std']:5.2f}"
                            for n in ("base", "new", "hm"))
            rows.append(f"{label:22}{cells}")
        return "\n".join(rows)
    zero, chosen = entry["test_at_m0"], entry["test_at_chosen_m"]
    return (f"{dataset}, {entry['shots']} shots, seeds {seeds}: test accuracy M=0 (zero-shot) "
            f"{zero['mean']:.2f} ± {zero['std']:.2f}, M chosen on val {chosen['mean']:.2f} ± "
            f"{chosen['std']:.2f}")


def run(args) -> None:
    from ..clip import launch

    seeds, shot_counts = args.seeds, args.shots
    with launch() as context:
        out = clip_options.check_before_work(args, seeds, context, backend=args.solve_backend)
        dataset, encoder, templates, device, workers = clip_options.prepare(args, context)
        clip_options.claim_output(out, dataset, encoder, templates)
        jobs = [_Job(shots, seed) for shots in shot_counts for seed in seeds]
        test, skipped = None, {}
        for number, job in enumerate(jobs):  # every rank encodes its shards of every job
            features = clip_options.extract_seed(args, dataset, encoder, templates, workers,
                                                 out / "cache", job.seed, context,
                                                 shots=job.shots)
            test = features.test if test is None else test  # the same for every job
            skipped[f"k{job.shots}-seed{job.seed}"] = features.skipped
            if context.owner(number) == context.rank:
                _prepare_job(args, job, features)
        fitted = {}
        for number, job in enumerate(jobs):  # each rank fits its own jobs, whole
            if context.owner(number) == context.rank:
                fitted[number] = _fit(args, job, device, context.rank, encoder)
        runs, predictions = [], {}
        for number, job in enumerate(jobs):
            owner = context.owner(number)
            mine = fitted.get(number)
            shared = context.broadcast(
                None if mine is None else {**mine, "classes": (job.base, job.new, job.untrained)},
                src=owner,
            )
            job.base, job.new, job.untrained = shared.pop("classes")
            run, preds = _evaluate(args, job, shared, test, encoder, device, context)
            runs.append(run)
            predictions.update(preds)
            if context.is_main:
                print(_report_line(run), flush=True)
        if not context.is_main:
            return
    summaries = []
    for shots in shot_counts:
        group = [run for run in runs if run["shots"] == shots]
        print(runs_summary.seed_table(group))
        summaries.append(_summary(group))
        print(_summary_lines(dataset.name, summaries[-1]))
    results = {
        "dataset": dataset.name,
        "model": args.model,
        "checkpoint": encoder.checkpoint,
        "precision": encoder.precision,
        "preprocessing": encoder.preprocessing,
        "peft": encoder.model_id.get("peft"),
        "crop_scale": list(args.crop_scale),
        "subsample": args.subsample,
        "shots": shot_counts,
        "views": args.views,
        "templates": templates,
        "seeds": seeds,
        "training": {key: getattr(args, key) for key in (
            "blocks", "width", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
            "schedule", "gamma", "noise", "amp", "max_steps", "step_size")},
        "runs": runs,
        "summary": summaries,
        "std": "sample (n - 1) over seeds, percent",
        "skipped_images": skipped,
    }
    write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    save_safetensors(out / PREDICTIONS_NAME, {key: value.contiguous() for key, value in
                                              predictions.items()})
    print(f"results: {out / RESULTS_NAME}; test predictions at the chosen M: "
          f"{out / PREDICTIONS_NAME}")
    for shots in shot_counts:
        group = [run for run in runs if run["shots"] == shots]
        print(runs_summary.plot_by_steps(out / plot_name(shots), group))


def register(commands) -> None:
    parser = commands.add_parser(
        "run", help="extract -> fit -> choose M on val -> test, over shots and seeds; "
                    "mean ± std tables (base-to-new with --subsample)",
        formatter_class=options.Formatter)
    clip_options.add_data_options(parser)
    parser.add_argument("--subsample", choices=SUBSAMPLES, default="all",
                        help="all classes, or base-to-new: train on the first half of the "
                             "classes (base), test on base and on the rest (new)")
    options.add_seeds(parser, [1, 2, 3],
                      "seeds: each draws the shots, augmentations and the field's init")
    options.add_out(parser, "folder for the cache, results and plots")
    options.add_training_options(parser, seed=False)
    options.add_solve_options(parser, prefix="solve-")
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)

