"""``fma-fast run``: extract -> fit -> choose M on val -> test, for every shot count and seed;
mean ± std tables, and the base-to-new protocol (train on the base half of the classes, test
on base and new). The options translated for :func:`fma_fast.clip.run.run_experiment`.

Scales out under ``torchrun`` (:mod:`fma_fast.core.distributed`): the encoding is split over
the ranks by shards; the fits are dealt to the ranks whole (one (shots, seed) job each, round
robin), each rank choosing M on val for its own; then every rank solves its share of each
job's test rows. Results are gathered in job order: 1 or N processes give the same answer.
"""

from __future__ import annotations

import argparse

from ..core.protocol import SUBSAMPLES
from ..io.features import file_views
from ..train.refine import refine
from . import clip_options, options


def _fit_field(args):
    """The field's training with the command's options (the run protocol's ``fit_field``)."""
    def fit_field(train, class_features, *, seed, device):
        return options.fit_from_args(args, train.features, train.labels, class_features,
                                     seed=seed, device=device,
                                     views=file_views(train, None))
    return fit_field


def _refine_field(args):
    """The refinement of each fit with the command's options (None without
    --refine-epochs)."""
    if not args.refine_epochs:
        return None

    def refine_field(model, train, class_features, *, steps, seed, device):
        return refine(model, train.features, train.labels, class_features, steps=steps,
                      epochs=args.refine_epochs, lr=args.refine_lr, step_size=args.step_size,
                      seed=seed, device=device, progress=not args.quiet)
    return refine_field


TRAINING_RECORD = ("blocks", "width", "epochs", "batch_size", "lr", "weight_decay",
                   "warmup_epochs", "schedule", "gamma", "noise", "amp", "max_steps",
                   "step_size", "refine_epochs", "refine_lr")
"""The options results.json records as the run's training settings."""


def run(args) -> None:
    from ..clip import launch
    from ..clip.experiment import SolveSettings
    from ..clip.run import run_experiment

    with launch() as context:
        out = clip_options.check_before_work(args, args.seeds, context,
                                             backend=args.solve_backend)
        inputs = clip_options.load_inputs(args, context)
        if args.refine_epochs and getattr(inputs.encoder, "per_image", False):
            raise ValueError("--refine-epochs takes one class table; CoCoOp's per-image tables "
                             "are not supported")
        inputs.claim(out)
        run_experiment(
            inputs, out, shots=args.shots, seeds=args.seeds,
            extract=clip_options.extract_options(args), fit_field=_fit_field(args),
            solve=SolveSettings(args.max_steps, args.step_size, args.solve_precision,
                                args.solve_backend),
            subsample=args.subsample, save_classifiers=args.save_classifiers,
            training={key: getattr(args, key) for key in TRAINING_RECORD}, context=context,
            refine_field=_refine_field(args),
        )


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
    options.add_refine_options(parser)
    options.add_solve_options(parser, prefix="solve-")
    parser.add_argument("--save-classifiers", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="save each (shots, seed) fit as a classifier folder under "
                             "OUT/classifiers (the field, its M, class table and encoder spec)")
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)

