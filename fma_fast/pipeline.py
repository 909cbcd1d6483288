"""``fma-fast extract`` and ``fma-fast run``: real images through a CLIP encoder to results.

Both commands scale out under ``torchrun`` (see :mod:`fma_fast.clip.distributed`): encoding
and solving are split over the ranks, rank 0 fits and writes, every rank gets the same answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import cli
from ._io import atomic_write, check_output_folder, save_safetensors, write_text
from .features_io import check_feature_files, claim_folder, save_features
from .solver import select_steps

PLOT_NAME = "accuracy_by_steps.png"
RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.safetensors"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and encoder")
    group.add_argument(
        "--dataset",
        required=True,
        help="dataset name (oxford_pets, imagenet, ...), "
        "a class-per-folder directory or a CSV file (path,label[,classname])",
    )
    group.add_argument("--root", default=None, help="folder holding the datasets (default: .)")
    group.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    group.add_argument(
        "--checkpoint",
        default=None,
        help="local weights file for --model (default: random init, for smoke runs)",
    )
    group.add_argument(
        "--model-config",
        default=None,
        help="register an open_clip architecture JSON first (its name is the stem)",
    )
    group.add_argument("--shots", type=int, default=16, help="K per class (default %(default)s)")
    group.add_argument(
        "--views",
        type=int,
        default=10,
        help="augmented views per training image (default %(default)s)",
    )
    group.add_argument(
        "--template",
        action="append",
        default=None,
        help="prompt template with {} (repeat for an ensemble, or 'imagenet7'; "
        "default: the dataset's CoOp template)",
    )
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="encoder autocast on CUDA; auto = fp16 (default %(default)s)",
    )
    group.add_argument(
        "--encode-batch-size",
        type=int,
        default=256,
        help="crops per encoder call (default %(default)s)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image decoding processes (default: 8 on CUDA, 0 on CPU)",
    )
    group.add_argument(
        "--shard-size", type=int, default=1024, help="images per cache shard (default %(default)s)"
    )
    group.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="unreadable image: skip and count it, or stop (default %(default)s)",
    )


def _check_options(args, seeds: list[int], context) -> Path:
    """What can be checked before the dataset is read or the encoder built: the device, the
    output folder, repeated seeds (and, for ``run``, the solver backend)."""
    if len(set(seeds)) != len(seeds):
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        raise ValueError(f"seeds must differ: {' '.join(map(str, repeated))} given twice")
    device = context.device(args.device)
    if hasattr(args, "solve_backend"):
        cli.check_backend(args.solve_backend, device)
    return check_output_folder(args.output, "--output")


def _prepare(args, context):
    """Dataset, encoder, templates and device from the shared options."""
    from .clip import load_dataset, load_encoder, register_model_config, resolve_templates

    device = context.device(args.device)
    dataset = load_dataset(args.dataset, args.root)
    model = register_model_config(args.model_config) if args.model_config else args.model
    if args.model_config and model != args.model:
        raise ValueError(
            f"--model-config {args.model_config} registers {model!r}, not {args.model!r}"
        )
    encoder = load_encoder(model, args.checkpoint, device=device, precision=args.precision)
    templates = resolve_templates(args.template, dataset.name)
    if args.workers is not None:
        workers = args.workers
    else:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if context.is_main:
        print(
            f"dataset {dataset.name}: {len(dataset.class_names)} classes, {len(dataset.train)} "
            f"train / {len(dataset.val) if dataset.val is not None else 'no'} val / "
            f"{len(dataset.test)} test images; model {args.model} ({encoder.checkpoint[:19]}), "
            f"{encoder.precision} on {device}, input {encoder.preprocessing['size']}",
            flush=True,
        )
    return dataset, encoder, templates, device, workers


def _extract(args, dataset, encoder, templates, workers, folder, seed, context):
    from .clip import extract

    features = extract(
        encoder,
        dataset,
        folder,
        shots=args.shots,
        seed=seed,
        views=args.views,
        templates=templates,
        shard_size=args.shard_size,
        batch_size=args.encode_batch_size,
        workers=workers,
        on_error=args.on_error,
        progress=not args.quiet,
        context=context,
    )
    for split, paths in features.skipped.items():
        if paths and context.is_main:
            print(f"skipped {len(paths)} unreadable {split} image(s), e.g. {paths[0]}")
    return features


def _claim_output(out: Path, dataset, encoder, templates) -> dict[str, Any]:
    """Tie --output to this extraction's source; an output folder of another is refused."""
    from .clip.cache import extraction_source

    source = extraction_source(encoder, dataset, templates)
    claim_folder(out, source, "--output")
    return source


def cmd_extract(args) -> None:
    from .clip import launch

    with launch() as context:
        out = _check_options(args, args.seed, context)
        dataset, encoder, templates, _, workers = _prepare(args, context)
        _claim_output(out, dataset, encoder, templates)
        for seed in args.seed:
            features = _extract(
                args, dataset, encoder, templates, workers, out / "cache", seed, context
            )
            if not context.is_main:
                continue
            written = []
            # The test split depends on neither seed nor K: one file beside the per-seed ones.
            splits = ("train", "val", "test") if seed == args.seed[0] else ("train", "val")
            for split in splits:
                data = getattr(features, split)
                folder = out if split == "test" else out / f"seed{seed}-k{args.shots}"
                path = folder / f"{split}.safetensors"
                save_features(
                    path, data.features, data.class_features, data.labels, data.class_names,
                    provenance=data.provenance,
                )
                written.append(f"{path} ({data.features.shape[0]} rows)")
            print(f"seed {seed}: wrote " + ", ".join(written), flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0, as CoOp's result parser), in percent."""
    mean = sum(values) / len(values)
    return 100 * mean, 100 * math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _by_steps(runs: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [_mean_std(list(column)) for column in zip(*(run[key] for run in runs))]


def _table(runs: list[dict[str, Any]]) -> str:
    val, test = _by_steps(runs, "val_accuracy"), _by_steps(runs, "test_accuracy")
    chosen = [run["chosen_steps"] for run in runs]
    lines = ["  M      val acc         test acc     (mean ± std over seeds)"]
    for steps, ((vm, vs), (tm, ts)) in enumerate(zip(val, test)):
        mark = f"  <- chosen for {chosen.count(steps)} seed(s)" if steps in chosen else ""
        lines.append(f"{steps:>3}  {vm:6.2f} ± {vs:5.2f}  {tm:6.2f} ± {ts:5.2f}{mark}")
    return "\n".join(lines)


def _plot(path: Path, runs: list[dict[str, Any]]) -> str:
    """Mean ± std accuracy per M on val and test; a PNG when matplotlib is installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install fma_fast[plot])"
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    steps = list(range(len(runs[0]["test_accuracy"])))
    for key, label in (("val_accuracy", "val"), ("test_accuracy", "test")):
        stats = _by_steps(runs, key)
        mean = [m for m, _ in stats]
        axes.plot(steps, mean, marker="o", label=label)
        axes.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    for number, chosen in enumerate(sorted({run["chosen_steps"] for run in runs})):
        label = "M chosen on val" if number == 0 else None
        axes.axvline(chosen, color="grey", linestyle=":", label=label)
    axes.set_xticks(steps)
    axes.set_xlabel("Euler steps M")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"FMA accuracy per M, mean ± std over {len(runs)} seed(s)")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png"))
    return f"plot: {path}"


def _run_seed(args, features, seed, device, context) -> tuple[dict[str, Any], torch.Tensor]:
    from .clip import accuracy_by_steps_sharded, solve_sharded

    train, val, test = features.train, features.val, features.test
    check_feature_files({"train": train, "val": val, "test": test})
    fitted = None
    if context.is_main:
        start = time.perf_counter()
        options = argparse.Namespace(**{**vars(args), "seed": seed, "device": str(device)})
        fitted = cli._fit_from_args(options, train.features, train.labels, train.class_features)
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


def cmd_run(args) -> None:
    from .clip import launch

    seeds = [args.seed] if args.seed is not None else args.seeds
    with launch() as context:
        out = _check_options(args, seeds, context)
        dataset, encoder, templates, device, workers = _prepare(args, context)
        _claim_output(out, dataset, encoder, templates)
        runs, predictions, skipped = [], {}, {}
        for seed in seeds:
            features = _extract(
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
    zero = _mean_std([run["test_accuracy"][0] for run in runs])
    chosen = _mean_std([run["test_accuracy"][run["chosen_steps"]] for run in runs])
    print(_table(runs))
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
            "std": "population (ddof=0) over seeds, percent",
            "test_at_m0": {"mean": zero[0], "std": zero[1]},
            "test_at_chosen_m": {"mean": chosen[0], "std": chosen[1]},
            "val_by_steps": _by_steps(runs, "val_accuracy"),
            "test_by_steps": _by_steps(runs, "test_accuracy"),
        },
        "skipped_images": skipped,
    }
    write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    save_safetensors(out / PREDICTIONS_NAME, predictions)
    print(
        f"results: {out / RESULTS_NAME}; test predictions at the chosen M: {out / PREDICTIONS_NAME}"
    )
    print(_plot(out / PLOT_NAME, runs))


def add_commands(commands) -> None:
    """Register ``extract`` and ``run`` on the ``fma-fast`` subparsers."""
    extract = commands.add_parser(
        "extract", help="encode a few-shot dataset with a CLIP model into feature files"
    )
    _add_data_options(extract)
    extract.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[1],
        help="seeds of the K-shot draws and augmentations (default 1)",
    )
    extract.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda if "
        "present; under torchrun each rank takes its local GPU)",
    )
    extract.add_argument("--output", required=True, help="output folder")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(run=cmd_extract)

    run = commands.add_parser(
        "run", help="extract -> fit -> choose M on val -> test, over seeds; mean ± std table"
    )
    _add_data_options(run)
    run.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="seeds (default: 1 2 3); each draws the shots, augmentations and init",
    )
    run.add_argument("--output", required=True, help="folder for the cache, results and plot")
    cli._add_training_options(run, {})
    cli.add_solve_options(run, prefix="solve-")
    for action in run._actions:
        if action.dest == "seed":
            action.help = "run this one seed instead of --seeds"
    run.set_defaults(run=cmd_run, seed=None)
