"""``fma-fast train``: fit on a feature file, choose M on a validation file, save the model."""

from __future__ import annotations

from pathlib import Path

from ..io import checkpoint
from ..io.features import check_feature_files, data_record
from ..solver.api import select_steps
from . import options


def run(args) -> None:
    options.check_device(args.device)
    out = options.require_out(args)
    read = {"normalize": args.normalize, "require_labels": True}
    train, changed = options.read_features(args.features, **read)
    val, changed_val = options.read_features(args.val, **read) if args.val else (None, 0)
    if changed + changed_val:
        print(f"L2-normalised {changed} train and {changed_val} val rows that were not "
              "unit-norm (--no-normalize keeps them raw)")
    if val is not None:
        check_feature_files({Path(args.features).name: train, Path(args.val).name: val})
    options.check_model_output(out, args.blocks, args.width, train.features.shape[1])
    peft = (train.source or {}).get("peft") or {}
    if peft.get("method") == "cocoop":
        raise ValueError(f"{args.features} holds CoCoOp features, whose class tables depend on "
                         "the image: use fma-fast run --peft cocoop")
    views = options.file_views(train, args.views)
    result = options.fit_from_args(args, train.features, train.labels, train.class_features,
                                   views=views)
    extra = {"step_size": args.step_size, "data": data_record(train),
             "normalize": args.normalize}
    if val is not None:
        selection = select_steps(result.model, val.features, val.labels, val.class_features,
                                 max_steps=args.max_steps, step_size=args.step_size,
                                 device=args.device)
        extra.update(steps=selection.best_steps, val_accuracy=selection.accuracy)
        print(selection.table())
    else:
        print("no --val file: M is not chosen; pass --steps to 'fma-fast eval'")
    checkpoint.save(result, out, extra=extra)
    print(f"loss {result.history[0]:.4f} -> {result.history[-1]:.4f} in "
          f"{result.config['optimizer_steps']} optimizer steps; saved to {out}")


def register(commands) -> None:
    parser = commands.add_parser(
        "train", help="fit on a feature file, choose M on --val, save the model",
        formatter_class=options.Formatter)
    parser.add_argument("features", help="safetensors feature file with labels")
    parser.add_argument("--val", help="validation feature file (chooses M)")
    parser.add_argument("--views", type=int, default=None,
                        help="augmented views per training image, image-major rows (None: as "
                             "the file's provenance says, else 1)")
    options.add_normalize(parser, True, "L2-normalise the rows of the feature files")
    options.add_out(parser, "output model folder")
    options.add_training_options(parser)
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
