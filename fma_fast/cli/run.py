"""``fma-fast run``: extract -> fit -> choose M on val -> test, over seeds; mean ± std table.

Scales out under ``torchrun`` (:mod:`fma_fast.clip.distributed`): encoding and solving are
split over the ranks, rank 0 fits and writes, every rank gets the same answer.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from .._io import save_safetensors, write_text
from ..features_io import check_feature_files
from ..report import runs as runs_summary
from ..solver import select_steps
from . import clip_options, options

PLOT_NAME = "accuracy_by_steps.png"
RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.safetensors"


def _run_seed(args, features, seed, device, context) -> tuple[dict[str, Any], torch.Tensor]:
    from ..clip import accuracy_by_steps_sharded, solve_sharded

    train, val, test = features.train, features.val, features.test
    check_feature_files({"train": train, "val": val, "test": test})
    fitted = None
    if context.is_main:
        start = time.perf_counter()
        fitted = options.fit_from_args(args, train.features, train.labels, train.class_features,
                                       seed=seed, device=str(device))
        fitted = (fitted.model, fitted.history, time.perf_counter() - start)
    model, history, seconds = context.broadcast(fitted)
    solve_options = {"precision": args.solve_precision, "backend": args.solve_backend}
    selection = None
    if context.is_main:  # the val split is small (min(K, 4) per class): no need to shard it
        selection = select_steps(
            model, val.features, val.labels, val.class_features, args.max_steps, args.step_size,
            device=device, **solve_options,
        )
    selection = context.broadcast(selection)
    best = selection.best_steps
    test_accuracy = accuracy_by_steps_sharded(
        model, test.features, test.labels, test.class_features, max_steps=args.max_steps,
        step_size=args.step_size, device=device, context=context, **solve_options,
    )
    result = solve_sharded(
        test.features,
        model,
        best,
        class_features=test.class_features,
        context=context,
        step_size=args.step_size,
        device=device,
        **solve_options,
    )
    pred = result.pred
    run = {
        "seed": seed,
        "chosen_steps": best,
        "val_accuracy": selection.accuracy,
        "val_cross_entropy": selection.cross_entropy,
        "solve_path": result.path,
        "test_accuracy": test_accuracy,
        "train_rows": int(train.features.shape[0]),
        "val_rows": int(val.features.shape[0]),
        "test_rows": int(test.features.shape[0]),
        "fit_seconds": round(seconds, 3),
        "loss_first_last": [history[0], history[-1]],
    }
    return run, pred


def run(args) -> None:
    from ..clip import launch

    seeds = args.seeds
    with launch() as context:
        out = clip_options.check_before_work(args, seeds, context, backend=args.solve_backend)
        dataset, encoder, templates, device, workers = clip_options.prepare(args, context)
        clip_options.claim_output(out, dataset, encoder, templates)
        runs, predictions, skipped = [], {}, {}
        for seed in seeds:
            features = clip_options.extract_seed(
                args, dataset, encoder, templates, workers, out / "cache", seed, context
            )
            run, pred = _run_seed(args, features, seed, device, context)
            runs.append(run)
            predictions[f"seed{seed}"] = pred
            predictions["labels"] = features.test.labels
            skipped[f"seed{seed}"] = features.skipped
            if context.is_main:
                test, best = run["test_accuracy"], run["chosen_steps"]
                print(
                    f"seed {seed}: {run['train_rows']} train rows ({args.shots} shots x "
                    f"{args.views} views), fit {run['fit_seconds']:.1f} s, M={best} chosen on "
                    f"val ({100 * run['val_accuracy'][best]:.2f}%), test {100 * test[best]:.2f}% "
                    f"(M=0: {100 * test[0]:.2f}%)",
                    flush=True,
                )
        if not context.is_main:
            return
    zero = runs_summary.percent([run["test_accuracy"][0] for run in runs])
    chosen = runs_summary.percent([run["test_accuracy"][run["chosen_steps"]] for run in runs])
    print(runs_summary.seed_table(runs))
    print(
        f"{dataset.name}, {args.shots} shots, seeds {' '.join(map(str, seeds))}: "
        f"test accuracy M=0 (zero-shot) {zero[0]:.2f} ± {zero[1]:.2f}, "
        f"M chosen on val {chosen[0]:.2f} ± {chosen[1]:.2f}"
    )
    training = {
        key: getattr(args, key)
        for key in (
            "blocks",
            "width",
            "epochs",
            "batch_size",
            "lr",
            "weight_decay",
            "gamma",
            "noise",
            "amp",
            "max_steps",
            "step_size",
        )
    }
    results = {
        "dataset": dataset.name,
        "model": args.model,
        "checkpoint": encoder.checkpoint,
        "precision": encoder.precision,
        "preprocessing": encoder.preprocessing,
        "shots": args.shots,
        "views": args.views,
        "templates": templates,
        "seeds": seeds,
        "training": training,
        "runs": runs,
        "summary": {
            "std": "sample (n - 1) over seeds, percent",
            "test_at_m0": {"mean": zero[0], "std": zero[1]},
            "test_at_chosen_m": {"mean": chosen[0], "std": chosen[1]},
            "val_by_steps": runs_summary.by_steps(runs, "val_accuracy"),
            "test_by_steps": runs_summary.by_steps(runs, "test_accuracy"),
        },
        "skipped_images": skipped,
    }
    write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    save_safetensors(out / PREDICTIONS_NAME, predictions)
    print(
        f"results: {out / RESULTS_NAME}; test predictions at the chosen M: {out / PREDICTIONS_NAME}"
    )
    print(runs_summary.plot_by_steps(out / PLOT_NAME, runs))


def register(commands) -> None:
    parser = commands.add_parser(
        "run", help="extract -> fit -> choose M on val -> test, over seeds; mean ± std table",
        formatter_class=options.Formatter)
    clip_options.add_data_options(parser)
    options.add_seeds(parser, [1, 2, 3],
                      "seeds: each draws the shots, augmentations and the field's init")
    options.add_out(parser, "folder for the cache, results and plot")
    options.add_training_options(parser, seed=False)
    options.add_solve_options(parser, prefix="solve-")
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
