"""``fma-fast eval``: score a feature file with a saved model
(:func:`fma_fast.batch.evaluate.evaluate_file`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..batch.evaluate import evaluate_file
from ..io.files import write_text
from . import options


def run(args) -> None:
    device = options.check_device(args.device)
    options.check_backend(args.backend, device)
    out = getattr(args, "out", None)
    if out is not None:
        options.check_predictions_output(Path(out), "--out")
    evaluation = evaluate_file(args.features, args.model, steps=args.steps,
                               step_size=args.step_size, topk=args.topk,
                               normalize=args.normalize, device=args.device,
                               precision=args.precision, backend=args.backend)
    print(json.dumps(evaluation.summary))
    if out is not None:
        write_text(out, json.dumps(evaluation.predictions()))


def register(commands) -> None:
    parser = commands.add_parser("eval", help="score a feature file with a saved model",
                                 formatter_class=options.Formatter)
    parser.add_argument("features", help="safetensors feature file (labels optional)")
    parser.add_argument("--model", required=True, help="model folder written by 'train'")
    parser.add_argument("--steps", type=int, default=None, help="M (None: chosen on val)")
    parser.add_argument("--step-size", type=float, default=None, help="h (None: as trained)")
    parser.add_argument("--topk", type=int, default=1, help="classes kept per row")
    options.add_normalize(parser, None, "L2-normalise the feature rows (None: as the model "
                                        "was trained, normalised for older models)")
    options.add_device(parser)
    parser.add_argument("--out", default=argparse.SUPPRESS,
                        help="write the predictions as JSON here (optional)")
    parser.add_argument("--output", dest="out", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    options.add_solve_options(parser)
    parser.set_defaults(run=run)
