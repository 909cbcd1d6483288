"""``fma-fast run``: extract -> fit -> choose M on val -> test, for every shot count and seed;
mean ± std tables, and the base-to-new protocol (train on the base half of the classes, test
on base and new).

Scales out under ``torchrun`` (:mod:`fma_fast.core.distributed`): the encoding is split over
the ranks by shards; the fits are dealt to the ranks whole (one (shots, seed) job each, round
robin), each rank choosing M on val for its own; then every rank solves its share of each
job's test rows. Results are gathered in job order: 1 or N processes give the same answer.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..core.protocol import SUBSAMPLES
from ..experiments.report import runs as runs_summary
from ..io.files import save_safetensors, write_text
from . import clip_options, options

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.safetensors"
CLASSIFIERS_NAME = "classifiers"


def plot_name(shots: int) -> str:
    return f"accuracy_by_steps-k{shots}.png"


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


def _fit_field(args):
    """The field's training with the command's options (the run protocol's ``fit_field``)."""
    def fit_field(train, class_features, *, seed, device):
        return options.fit_from_args(args, train.features, train.labels, class_features,
                                     seed=seed, device=device,
                                     views=options.file_views(train, None))
    return fit_field


def run(args) -> None:
    from ..clip import launch
    from ..clip.experiment import Job, SolveSettings, run_jobs

    seeds, shot_counts = args.seeds, args.shots
    with launch() as context:
        out = clip_options.check_before_work(args, seeds, context, backend=args.solve_backend)
        dataset, encoder, templates, device, workers = clip_options.prepare(args, context)
        clip_options.claim_output(out, dataset, encoder, templates)
        solve = SolveSettings(args.max_steps, args.step_size, args.solve_precision,
                              args.solve_backend)
        outcome = run_jobs(
            [Job(shots, seed) for shots in shot_counts for seed in seeds],
            extract_job=lambda job: clip_options.extract_seed(
                args, dataset, encoder, templates, workers, out / "cache", job.seed, context,
                shots=job.shots),
            fit_field=_fit_field(args), encoder=encoder, solve=solve,
            subsample=args.subsample, device=device, context=context,
            on_run=lambda run: print(_report_line(run), flush=True),
        )
        if not context.is_main:
            return
    runs, predictions, skipped = outcome.runs, outcome.predictions, outcome.skipped
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
        "pretrained": encoder.model_id.get("pretrained"),
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
        "classifiers": ([f"{CLASSIFIERS_NAME}/{job.key}" for job in outcome.jobs]
                        if args.save_classifiers else []),
    }
    write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    save_safetensors(out / PREDICTIONS_NAME, {key: value.contiguous() for key, value in
                                              predictions.items()})
    print(f"results: {out / RESULTS_NAME}; test predictions at the chosen M: "
          f"{out / PREDICTIONS_NAME}")
    for shots in shot_counts:
        group = [run for run in runs if run["shots"] == shots]
        print(runs_summary.plot_by_steps(out / plot_name(shots), group))
    if args.save_classifiers:
        _save_classifiers(args, out, outcome, encoder, templates, dataset.name, solve)


def _save_classifiers(args, out, outcome, encoder, templates, dataset: str, solve) -> None:
    """One classifier folder per (shots, seed), scored against every class (base-to-new: the
    field fitted on base, M chosen on base val, applied to the whole table)."""
    from ..clip.classifier import FewShotClassifier

    for job, run, fitted in zip(outcome.jobs, outcome.runs, outcome.fitted):
        record = {"shots": job.shots, "seed": job.seed, "views": args.views,
                  "crop_scale": list(args.crop_scale), "dataset": dataset,
                  "subsample": args.subsample, "classes": run.get("classes")}
        classifier = FewShotClassifier.from_fitted(encoder, templates, outcome.test, fitted,
                                                   solve, record)
        classifier.save(out / CLASSIFIERS_NAME / job.key)
    print(f"classifiers (one per shots and seed, FewShotClassifier.load): "
          f"{out / CLASSIFIERS_NAME}/k*-seed*")


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
    parser.add_argument("--save-classifiers", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="save each (shots, seed) fit as a classifier folder under "
                             "OUT/classifiers (the field, its M, class table and encoder spec)")
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)

