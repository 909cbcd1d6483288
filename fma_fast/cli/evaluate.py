"""``fma-fast eval``: score a feature file with a saved model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.model import normalizes, solve_settings
from ..io import checkpoint
from ..io.features import check_same_origin, data_record
from ..io.files import write_text
from ..solver.api import solve
from . import options


def run(args) -> None:
    device = options.check_device(args.device)
    options.check_backend(args.backend, device)
    out = getattr(args, "out", None)
    if out is not None:
        options.check_predictions_output(Path(out), "--out")
    model = checkpoint.load(args.model)  # carries M, h and normalize: the rules of score
    steps, step_size = solve_settings(model, args.steps, args.step_size)
    if steps is None:
        raise ValueError(f"{args.model} has no M chosen on val; pass --steps")
    data, normalized_rows = options.read_features(args.features,
                                                  normalize=normalizes(model, args.normalize))
    if isinstance(model.trained_on, dict):
        check_same_origin(
            {f"the data model {args.model} was trained on": model.trained_on,
             Path(args.features).name: data_record(data)}
        )
    solve_options = {"step_size": step_size, "class_features": data.class_features,
                     "device": args.device}
    labelled = data.labels is not None
    result = solve(data.features, model, steps, topk=args.topk, precision=args.precision,
                   backend=args.backend, zero_shot=labelled, **solve_options)
    summary = {"steps": steps, "step_size": step_size, "rows": len(result.pred),
               "path": result.path, "normalized_rows": normalized_rows}
    if labelled:  # M=0 scored in the same pass over the states
        summary["accuracy"] = float((result.pred == data.labels).double().mean())
        summary["accuracy_at_m0"] = float((result.zero_shot_pred == data.labels).double().mean())
    print(json.dumps(summary))
    if out is not None:
        payload = {
            "format": options.PREDICTIONS_FORMAT,
            **summary,
            "pred": result.pred.tolist(),
            "topk_indices": result.topk_indices.tolist(),
            "topk_values": result.topk_values.tolist(),
        }
        write_text(out, json.dumps(payload))


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
