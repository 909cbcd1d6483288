"""``fma-fast train``: fit on a feature file, choose M on a validation file, save the model
(:func:`fma_fast.train.files.fit_on_files`)."""

from __future__ import annotations

from ..io import checkpoint
from ..train.files import TrainingFiles, fit_on_files
from . import options


def run(args) -> None:
    options.check_device(args.device)
    out = options.require_out(args)
    if args.refine_epochs and args.val is None:
        raise ValueError("--refine-epochs needs --val: the field is refined at the M chosen "
                         "there")
    files = TrainingFiles.read(args.features, args.val, normalize=args.normalize)
    if files.changed + files.changed_val:
        print(f"L2-normalised {files.changed} train and {files.changed_val} val rows that were "
              "not unit-norm (--no-normalize keeps them raw)")
    files.check_together()
    options.check_model_output(out, args.blocks, args.width, files.train.features.shape[1])
    trained = fit_on_files(files, options.fit_settings(args), views=args.views,
                           max_steps=args.max_steps, step_size=args.step_size,
                           normalize=args.normalize, device=args.device,
                           refine_epochs=args.refine_epochs, refine_lr=args.refine_lr)
    if trained.before_refinement is not None:
        print(trained.before_refinement.table())
        refinement = trained.result.config["refinement"]
        if "skipped" in refinement:
            print("M=0 chosen on val: the field is not used there, nothing to refine")
        else:
            history = refinement["history"]
            print(f"refined at M={refinement['steps']}: loss {history[0]:.4f} -> "
                  f"{history[-1]:.4f}; M chosen again on val:")
            print(trained.selection.table())
    elif trained.selection is not None:
        print(trained.selection.table())
    else:
        print("no --val file: M is not chosen; pass --steps to 'fma-fast eval'")
    checkpoint.save(trained.result, out, extra=trained.extra)
    result = trained.result
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
    options.add_refine_options(parser)
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
