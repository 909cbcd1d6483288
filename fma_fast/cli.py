"""The ``fma-fast`` command: demo, synth, train and eval."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from . import _validation as check
from . import checkpoint, dispatch, doctor, pipeline, report, synthetic
from ._io import check_output_file, check_output_folder, describe_os_error, write_text
from .checkpoint import CheckpointError
from .features_io import (
    FeatureFileError,
    check_feature_files,
    check_same_origin,
    data_record,
    load_features,
    save_features,
)
from .model import VelocityNet
from .policy import PRECISIONS, SOLVE_BACKENDS
from .solver import accuracy_by_steps, select_steps, solve
from .training import AMP_CHOICES, fit

PREDICTIONS_FORMAT = "fma_fast/predictions/1"

DEMO_DEFAULTS = {
    "classes": 20,
    "dim": 512,
    "shots": 16,
    "difficulty": 0.75,
    "blocks": 2,
    "epochs": 60,
    "gamma": 0.05,
}


def _accuracy_table(val: list[float] | None, test: list[float], chosen: int) -> str:
    header = "  M   val acc  test acc" if val is not None else "  M  test acc"
    lines = [header]
    for steps, test_acc in enumerate(test):
        val_part = f"  {100 * val[steps]:7.2f}%" if val is not None else ""
        mark = "  <- chosen on val" if steps == chosen else ""
        lines.append(f"{steps:>3}{val_part}  {100 * test_acc:7.2f}%{mark}")
    return "\n".join(lines)


def _add_training_options(parser: argparse.ArgumentParser, defaults: dict) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--blocks",
        type=int,
        default=defaults.get("blocks", 12),
        help="residual blocks of the velocity network (default %(default)s)",
    )
    group.add_argument(
        "--width", type=int, default=None, help="hidden width (default: feature dim)"
    )
    group.add_argument(
        "--epochs", type=int, default=defaults.get("epochs", 200), help="default %(default)s"
    )
    group.add_argument("--batch-size", type=int, default=32, help="default %(default)s")
    group.add_argument("--lr", type=float, default=2e-4, help="default %(default)s")
    group.add_argument("--weight-decay", type=float, default=0.01, help="default %(default)s")
    group.add_argument(
        "--gamma",
        type=float,
        default=defaults.get("gamma", 0.0),
        help="noise strength (default %(default)s)",
    )
    group.add_argument(
        "--noise",
        choices=("bridge", "endpoint"),
        default="bridge",
        help="noise form: released code's bridge or the paper's (default %(default)s)",
    )
    group.add_argument("--seed", type=int, default=1, help="default %(default)s")
    group.add_argument(
        "--amp", choices=AMP_CHOICES, default="auto", help="autocast on CUDA (default %(default)s)"
    )
    group.add_argument(
        "--max-steps",
        type=int,
        default=10,
        help="largest M tried when choosing M on val (default %(default)s)",
    )
    group.add_argument(
        "--step-size", type=float, default=0.1, help="Euler step h (default %(default)s)"
    )
    group.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def add_solve_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--[prefix]precision and --[prefix]backend of :func:`fma_fast.solve`."""
    parser.add_argument(
        f"--{prefix}precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="solver GEMM precision: fp32 (exact), bf16 (CPU/GPU), fp16 (CUDA) "
        "(default %(default)s)",
    )
    parser.add_argument(
        f"--{prefix}backend",
        choices=SOLVE_BACKENDS,
        default="auto",
        help="solver path: auto (fastest exact), reference, folded, triton (default %(default)s)",
    )


def check_device(device: str | None) -> torch.device:
    """The --device option as a device that exists here (checked before any work)."""
    return check.resolve_device(device)


def check_backend(backend: str, device: torch.device) -> None:
    """--backend triton must be runnable here, before features are encoded or a field fit."""
    if backend == "triton":
        dispatch.select_path("triton", torch.empty(0, device=device))


def _is_feature_file(path: Path) -> bool:
    try:
        load_features(path)
    except FeatureFileError:
        return False
    return True


def check_feature_output(path: Path, name: str) -> Path:
    """An output feature file: a new file, or an earlier feature file (nothing else)."""
    return check_output_file(path, name, kind="a feature file", is_kind=_is_feature_file)


def _is_predictions_file(path: Path) -> bool:
    """An earlier ``eval --output`` file (fma_fast 0.1 wrote no format tag)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(value, dict):
        return False
    return value.get("format") == PREDICTIONS_FORMAT or {"pred", "topk_indices"} <= set(value)


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 1024:.0f} KiB"


def _check_model_output(args, dim: int) -> Path:
    """--out of train: a writable folder with room for the weights, holding no foreign files."""
    out = check_output_folder(args.out, "--out")
    checkpoint.check_model_folder(out, "--out")
    with torch.device("meta"):
        size = 4 * sum(p.numel() for p in VelocityNet(dim, args.blocks, args.width).parameters())
    home = out if out.is_dir() else out.parent
    free = shutil.disk_usage(home).free
    if free < size + (1 << 20):
        raise OSError(
            f"not enough disk space for the model in {home}: it needs {_size(size + (1 << 20))}, "
            f"{_size(free)} are free"
        )
    return out


def _fit_from_args(args, features, labels, class_features):
    return fit(
        features,
        labels,
        class_features,
        blocks=args.blocks,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        gamma=args.gamma,
        noise=args.noise,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        progress=not args.quiet,
    )


def cmd_demo(args) -> None:
    check_device(args.device)
    task = synthetic.make_task(
        num_classes=args.classes,
        dim=args.dim,
        shots=args.shots,
        difficulty=args.difficulty,
        seed=args.seed,
    )
    print(
        f"synthetic task: {args.classes} classes, D={args.dim}, {args.shots} shots, "
        f"difficulty {args.difficulty}: {len(task.train.labels)} train / "
        f"{len(task.val.labels)} val / {len(task.test.labels)} test rows"
    )
    print(
        f"network: {args.blocks} residual blocks (the released default is 12; "
        f"the demo uses a small one to finish in about a minute on 2 CPU cores)"
    )
    start = time.perf_counter()
    result = _fit_from_args(args, task.train.features, task.train.labels, task.class_features)
    print(
        f"fit: {args.epochs} epochs in {time.perf_counter() - start:.1f} s, "
        f"loss {result.history[0]:.4f} -> {result.history[-1]:.4f}"
    )
    selection = select_steps(
        result.model,
        task.val.features,
        task.val.labels,
        task.class_features,
        max_steps=args.max_steps,
        step_size=args.step_size,
        device=args.device,
    )
    test = accuracy_by_steps(
        result.model,
        task.test.features,
        task.test.labels,
        task.class_features,
        max_steps=args.max_steps,
        step_size=args.step_size,
        device=args.device,
    )
    print(_accuracy_table(selection.accuracy, test, selection.best_steps))
    chosen = selection.best_steps
    print(
        f"test accuracy: M=0 (zero-shot) {100 * test[0]:.2f}%, "
        f"M={chosen} (chosen on val) {100 * test[chosen]:.2f}%"
    )


def cmd_synth(args) -> None:
    task = synthetic.make_task(
        num_classes=args.classes,
        dim=args.dim,
        shots=args.shots,
        difficulty=args.difficulty,
        seed=args.seed,
    )
    out = check_output_folder(args.out, "--out")
    paths = {name: out / f"{name}.safetensors" for name in ("train", "val", "test")}
    if out.is_dir():
        for path in paths.values():
            check_feature_output(path, "--out")
    source = {
        "kind": "synthetic",
        **{key: getattr(args, key) for key in ("classes", "dim", "shots", "difficulty", "seed")},
    }
    for name, path in paths.items():
        split = getattr(task, name)
        save_features(
            path,
            split.features,
            task.class_features,
            labels=split.labels,
            class_names=task.class_names,
            provenance={"source": source, "split": name},
        )
    print(f"wrote {out}/train.safetensors, val.safetensors, test.safetensors")


def cmd_train(args) -> None:
    check_device(args.device)
    train = load_features(args.features, require_labels=True)
    val = load_features(args.val, require_labels=True) if args.val else None
    if val is not None:
        check_feature_files({Path(args.features).name: train, Path(args.val).name: val})
    _check_model_output(args, train.features.shape[1])
    result = _fit_from_args(args, train.features, train.labels, train.class_features)
    extra = {"step_size": args.step_size, "data": data_record(train)}
    if val is not None:
        selection = select_steps(
            result.model,
            val.features,
            val.labels,
            val.class_features,
            max_steps=args.max_steps,
            step_size=args.step_size,
            device=args.device,
        )
        extra.update(steps=selection.best_steps, val_accuracy=selection.accuracy)
        print(selection.table())
    else:
        print("no --val file: M is not chosen; pass --steps to 'fma-fast eval'")
    checkpoint.save(result, args.out, extra=extra)
    print(f"loss {result.history[0]:.4f} -> {result.history[-1]:.4f}; saved to {args.out}")


def cmd_eval(args) -> None:
    device = check_device(args.device)
    check_backend(args.backend, device)
    if args.output:
        check_output_file(
            args.output, "--output", kind="a predictions file written by fma-fast eval",
            is_kind=_is_predictions_file,
        )
    model = checkpoint.load(args.model)
    config = checkpoint.load_config(args.model)
    steps = args.steps if args.steps is not None else config.get("steps")
    if steps is None:
        raise ValueError(f"{args.model} has no M chosen on val; pass --steps")
    step_size = args.step_size if args.step_size is not None else config.get("step_size", 0.1)
    data = load_features(args.features)
    if isinstance(config.get("data"), dict):
        check_same_origin(
            {f"the data model {args.model} was trained on": config["data"],
             Path(args.features).name: data_record(data)}
        )
    result = solve(
        data.features,
        model,
        steps,
        step_size=step_size,
        class_features=data.class_features,
        topk=args.topk,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
    )
    summary = {
        "steps": steps,
        "step_size": step_size,
        "rows": len(result.pred),
        "path": result.path,
    }
    if data.labels is not None:
        summary["accuracy"] = float((result.pred == data.labels).double().mean())
        summary["accuracy_at_m0"] = float(
            (
                solve(
                    data.features, model, 0, class_features=data.class_features, device=args.device
                ).pred
                == data.labels
            )
            .double()
            .mean()
        )
    print(json.dumps(summary))
    if args.output:
        payload = {
            "format": PREDICTIONS_FORMAT,
            **summary,
            "pred": result.pred.tolist(),
            "topk_indices": result.topk_indices.tolist(),
            "topk_values": result.topk_values.tolist(),
        }
        write_text(args.output, json.dumps(payload))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fma-fast", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="synthetic few-shot task -> fit -> choose M -> test")
    for option in ("classes", "dim", "shots"):
        demo.add_argument(
            f"--{option}", type=int, default=DEMO_DEFAULTS[option], help="default %(default)s"
        )
    demo.add_argument(
        "--difficulty",
        type=float,
        default=DEMO_DEFAULTS["difficulty"],
        help="0 easy .. 1 hard (default %(default)s)",
    )
    _add_training_options(demo, DEMO_DEFAULTS)
    demo.set_defaults(run=cmd_demo)

    synth = commands.add_parser("synth", help="write a synthetic task as train/val/test files")
    synth.add_argument("--out", required=True, help="output folder")
    for option in ("classes", "dim", "shots"):
        synth.add_argument(f"--{option}", type=int, default=DEMO_DEFAULTS[option])
    synth.add_argument("--difficulty", type=float, default=DEMO_DEFAULTS["difficulty"])
    synth.add_argument("--seed", type=int, default=1)
    synth.set_defaults(run=cmd_synth)

    train = commands.add_parser("train", help="fit on a feature file, choose M on --val, save")
    train.add_argument("features", help="safetensors feature file with labels")
    train.add_argument("--val", help="validation feature file (chooses M)")
    train.add_argument("--out", required=True, help="output model folder")
    _add_training_options(train, {})
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="score a feature file with a saved model")
    evaluate.add_argument("features", help="safetensors feature file (labels optional)")
    evaluate.add_argument("--model", required=True, help="model folder written by 'train'")
    evaluate.add_argument("--steps", type=int, default=None, help="M (default: chosen on val)")
    evaluate.add_argument("--step-size", type=float, default=None, help="default: as trained")
    evaluate.add_argument("--topk", type=int, default=1, help="default %(default)s")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--output", help="write predictions as JSON here")
    add_solve_options(evaluate)
    evaluate.set_defaults(run=cmd_eval)
    pipeline.add_commands(commands)
    report.add_command(commands)
    doctor.add_command(commands)
    return parser


def _one_line(error: BaseException) -> str:
    text = describe_os_error(error) if isinstance(error, OSError) and error.errno else str(error)
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except (
        CheckpointError,
        FeatureFileError,
        ValueError,
        TypeError,
        OSError,
        FloatingPointError,
        dispatch.BackendUnavailableError,
        torch.cuda.OutOfMemoryError,
    ) as error:
        print(f"fma-fast {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fma-fast: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
