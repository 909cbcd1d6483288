"""``fma-fast extract``: encode a few-shot dataset with a CLIP model into feature files.

Scales out under ``torchrun`` (:mod:`fma_fast.core.distributed`): shards are dealt to the
ranks, rank 0 writes the feature files.
"""

from __future__ import annotations

from ..clip.inputs import save_feature_files
from . import clip_options, options


def run(args) -> None:
    from ..clip import launch

    with launch() as context:
        out = clip_options.check_before_work(args, args.seeds, context)
        inputs = clip_options.load_inputs(args, context)
        inputs.claim(out)
        encode = clip_options.extract_options(args)
        jobs = [(shots, seed) for shots in args.shots for seed in args.seeds]
        for shots, seed in jobs:
            features = encode.extract(inputs, out / "cache", shots=shots, seed=seed,
                                      context=context)
            if not context.is_main:
                continue
            # The test split depends on neither seed nor K: one file beside the per-seed ones.
            written = save_feature_files(features, out, shots=shots, seed=seed,
                                         test=(shots, seed) == jobs[0])
            print(f"{shots} shots, seed {seed}: wrote " + ", ".join(written), flush=True)


def register(commands) -> None:
    parser = commands.add_parser(
        "extract", help="encode a few-shot dataset with a CLIP model into feature files",
        formatter_class=options.Formatter)
    clip_options.add_data_options(parser)
    options.add_seeds(parser, [1], "seeds of the K-shot draws and augmentations")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (None: cuda if present; under torchrun "
                             "each rank takes its local GPU)")
    options.add_out(parser, "output folder")
    options.add_quiet(parser)
    parser.set_defaults(run=run)
