"""``fma-fast score``: batch-score feature files, cache folders or .npy arrays with a saved
model into sharded top-k outputs; resumable, and split over torchrun ranks by input shard."""

from __future__ import annotations

from ..batch.writers import FORMATS
from ..core.policy import SOLVE_BATCH_ROWS
from . import options


def run(args) -> None:
    from ..batch.job import score
    from ..clip import launch

    with launch() as context:
        device = context.device(args.device)
        options.check_backend(args.backend, device)
        summary = score(
            args.model, args.inputs, args.classes, options.require_out(args), steps=args.steps,
            step_size=args.step_size, normalize=args.normalize, topk=args.topk,
            output_format=args.format,
            device=device, precision=args.precision, backend=args.backend,
            batch_size=args.batch_size, progress=not args.quiet, context=context,
        )
        if context.is_main:
            print(summary.line(), flush=True)


def register(commands) -> None:
    parser = commands.add_parser(
        "score", help="batch-score feature files, cache folders or .npy arrays (resumable)",
        formatter_class=options.Formatter)
    parser.add_argument("model", help="model folder written by 'train' (or fma_fast.save)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="safetensors feature file, folder of shards (an extraction cache "
                             "split) or .npy array (rows, D); read a chunk at a time")
    parser.add_argument("--classes", required=True,
                        help="class table: a feature file (its table and class names), or a "
                             "(C, D) .npy / safetensors table")
    options.add_out(parser, "output folder: parts, their records and manifest.json")
    parser.add_argument("--steps", type=int, default=None, help="M (None: chosen on val)")
    parser.add_argument("--step-size", type=float, default=None, help="h (None: as trained)")
    parser.add_argument("--topk", type=int, default=1, help="classes kept per row")
    options.add_normalize(parser, None, "L2-normalise the rows and the class table (None: as "
                                        "the model was trained, as eval does)")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="output format (csv/jsonl, with class names, for small jobs)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows read and solved at a time (None: "
                             f"{SOLVE_BATCH_ROWS['cpu']} on CPU, {SOLVE_BATCH_ROWS['cuda']} on "
                             "CUDA)")
    options.add_solve_options(parser)
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
