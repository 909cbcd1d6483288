"""What the commands share: option groups, the one helper that turns parsed options into
``fit`` arguments, and the checks that run before any work (device, backend, outputs)."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..batch.evaluate import PREDICTIONS_FORMAT
from ..core import validation as check
from ..core.model import VelocityNet
from ..core.names import AMP_ALIASES, AMPS, BACKENDS, NOISE_FORMS, PRECISIONS, SCHEDULES
from ..core.policy import DEFAULT_STEP_SIZE
from ..io import checkpoint
from ..io.features import FeatureFileError, load_features
from ..io.files import (
    JsonError,
    check_output_file,
    check_output_folder,
    nearest_existing_folder,
    read_json,
)
from ..ops import dispatch
from ..train.fit import FitSettings, fit
from ..train.refine import REFINE_LR


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default."""


def add_out(parser: argparse.ArgumentParser, help: str) -> None:
    """``--out``, the one name of every command's output (``--output`` is still read)."""
    parser.add_argument("--out", default=argparse.SUPPRESS, help=f"{help} (required)")
    parser.add_argument("--output", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_seeds(parser: argparse.ArgumentParser, default: list[int], help: str) -> None:
    """``--seeds S [S ...]`` (``--seed`` is read as one seed)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=default, help=help)
    parser.add_argument("--seed", type=int, nargs="+", dest="seeds", help=argparse.SUPPRESS)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (None: cuda if present, else cpu)")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (a bar on a terminal; in a log, a line with the rate "
                        "and ETA every 30 s, FMA_FAST_PROGRESS_SECONDS)")


def _amp(value: str) -> str:
    """--amp's value, an alias (--amp off) read as its name: argparse checks the choices after."""
    return AMP_ALIASES.get(value, value)


def add_training_options(
    parser: argparse.ArgumentParser, defaults: dict | None = None, *, seed: bool = True,
    why: str = "",
) -> None:
    """The options of ``fit`` (training group) and of choosing M (``--max-steps``); ``seed``
    False where the command's --seeds give each fit its seed. ``defaults`` that differ from
    fit's (the released code's) say so in --help, with ``why``."""
    defaults = defaults or {}
    released = FitSettings()

    def differs(name: str, help: str) -> str:
        if name in defaults and defaults[name] != getattr(released, name):
            return f"{help} ({why}; fit, train and run: {getattr(released, name)}, the " \
                   "released code's)"
        return help

    group = parser.add_argument_group("training")
    group.add_argument("--blocks", type=int, default=defaults.get("blocks", released.blocks),
                       help=differs("blocks", "residual blocks of the velocity network"))
    group.add_argument("--width", type=int, default=None, help="hidden width (None: feature dim)")
    group.add_argument("--epochs", type=int, default=defaults.get("epochs", released.epochs),
                       help=differs("epochs", "passes over the training images (one view of "
                                              "each per epoch)"))
    group.add_argument("--batch-size", type=int, default=released.batch_size,
                       help="rows per optimizer step")
    group.add_argument("--lr", type=float, default=released.lr, help="AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=released.weight_decay,
                       help="AdamW weight decay")
    group.add_argument("--warmup-epochs", type=int, default=released.warmup_epochs,
                       help="epochs of linear warm-up")
    group.add_argument("--schedule", choices=SCHEDULES, default="released",
                       help="learning-rate schedule: the released loop's, step for step, or a "
                            "warm-up then a cosine from --lr")
    group.add_argument("--gamma", type=float, default=defaults.get("gamma", released.gamma),
                       help=differs("gamma", "noise strength"))
    group.add_argument("--noise", choices=NOISE_FORMS, default="bridge",
                       help="noise form: the released code's bridge or the paper's endpoint")
    group.add_argument("--amp", choices=AMPS, default="auto", type=_amp,
                       help="autocast: auto = fp16 on CUDA, fp32 on the CPU; bf16 on CUDA or a "
                            "CPU with BF16 units")
    if seed:
        group.add_argument("--seed", type=int, default=1,
                           help="seed of the initialisation, batches and noise")
    group.add_argument("--max-steps", type=int, default=10,
                       help="largest M tried when choosing M on val")
    group.add_argument("--step-size", type=float, default=DEFAULT_STEP_SIZE, help="Euler step h")


def add_refine_options(parser: argparse.ArgumentParser) -> None:
    """``--refine-epochs``/``--refine-lr``: refinement of the fitted field at the M chosen on
    val (:func:`fma_fast.refine`), off by default."""
    group = parser.add_argument_group("refinement")
    group.add_argument("--refine-epochs", type=int, default=0,
                       help="then refine the field by the cross-entropy of its solve at the M "
                            "chosen on val for this many passes over the training rows, and "
                            "choose M again (0: no refinement)")
    group.add_argument("--refine-lr", type=float, default=REFINE_LR,
                       help="AdamW learning rate of the refinement")


def fit_settings(args: argparse.Namespace, **overrides: Any) -> FitSettings:
    """The training options of ``args`` (and ``overrides``, e.g. seed, views) as ``fit``'s
    checked settings."""
    settings = dict(
        blocks=args.blocks, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        schedule=args.schedule, gamma=args.gamma, noise=args.noise,
        seed=getattr(args, "seed", 1), amp=args.amp, progress=not args.quiet,
    )
    return FitSettings(**{**settings, **overrides})


def fit_from_args(args: argparse.Namespace, features, labels, class_features, *,
                  device=None, **overrides: Any):
    """``fit`` with the training options of ``args`` (and ``overrides``, e.g. seed, views) on
    ``device`` (None: --device)."""
    settings = fit_settings(args, **overrides)
    return fit(features, labels, class_features, device=args.device if device is None else device,
               **asdict(settings))


def add_normalize(parser: argparse.ArgumentParser, default: bool | None, help: str) -> None:
    """``--normalize/--no-normalize``: L2-normalise the rows of feature files as they are read."""
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=default,
                        help=help)


def add_solve_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--[prefix]precision and --[prefix]backend of :func:`fma_fast.solve`."""
    parser.add_argument(f"--{prefix}precision", choices=PRECISIONS, default="fp32",
                        help="solver GEMM precision: fp32 (exact), bf16 (CPU/GPU), fp16 (CUDA)")
    parser.add_argument(f"--{prefix}backend", choices=BACKENDS, default="auto",
                        help="solver path: auto (fastest exact), reference, folded, triton, "
                             "compiled (bf16 on the CPU, minutes of compiling first)")


def require_out(args: argparse.Namespace) -> Path:
    if getattr(args, "out", None) is None:
        raise ValueError("--out is required")
    return Path(args.out)


def check_device(device: str | None) -> torch.device:
    """The --device option as a device that exists here (checked before any work)."""
    return check.resolve_device(device)


def check_backend(backend: str, device: torch.device) -> None:
    """--backend triton must be runnable here, before features are encoded or a field fit
    (--backend compiled is checked against the precision when the solve resolves)."""
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
    """An earlier ``eval --out`` file (fma_fast 0.1 wrote no format tag)."""
    try:
        value = read_json(path, "predictions file")
    except JsonError:  # also a FIFO or a device in its place: refused, never opened
        return False
    if not isinstance(value, dict):
        return False
    return value.get("format") == PREDICTIONS_FORMAT or {"pred", "topk_indices"} <= set(value)


def check_predictions_output(path: Path, name: str) -> Path:
    return check_output_file(path, name, kind="a predictions file written by fma-fast eval",
                             is_kind=_is_predictions_file)


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 1024:.0f} KiB"


def check_model_output(out: Path, blocks: int, width: int | None, dim: int) -> Path:
    """A model's --out: a writable folder with room for the weights, holding no foreign files."""
    out = check_output_folder(out, "--out")
    checkpoint.check_model_folder(out, "--out")
    with torch.device("meta"):
        size = 4 * sum(p.numel() for p in VelocityNet(dim, blocks, width).parameters())
    home = nearest_existing_folder(out, "--out")
    free = shutil.disk_usage(home).free
    if free < size + (1 << 20):
        raise OSError(
            f"not enough disk space for the model in {home}: it needs {_size(size + (1 << 20))}, "
            f"{_size(free)} are free"
        )
    return out
