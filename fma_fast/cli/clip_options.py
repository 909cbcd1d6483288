"""What ``extract`` and ``run`` share: the data and encoder options, the checks before any
image is read, and their translation into the library's settings
(:class:`~fma_fast.clip.inputs.InputSettings`, :class:`~fma_fast.clip.inputs.ExtractOptions`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..clip.cache import ON_ERROR
from ..clip.inputs import ExtractOptions, Inputs, InputSettings
from ..clip.peft import CLASS_TOKEN_POSITIONS, PEFT_METHODS
from ..clip.transforms import AUGMENT_SCALE, check_crop_scale
from ..core.names import AMPS
from ..io.files import check_output_folder, file_problem
from . import options


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and encoder")
    group.add_argument("--dataset", required=True,
                       help="dataset name (oxford_pets, imagenet, ...), a class-per-folder "
                            "directory or a CSV file (path,label,classname)")
    group.add_argument("--root", default=".", help="folder holding the datasets")
    group.add_argument("--allow-empty-classes", action="store_true",
                       help="keep class folders without images (refused otherwise)")
    group.add_argument("--allow-unnamed-classes", action="store_true",
                       help="name CSV classes without a classname column by their labels")
    group.add_argument("--model", required=True,
                       help="open_clip architecture, e.g. ViT-B-16, or hf-hub:org/repo "
                            "(architecture and weights from that repo)")
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default=None,
                         help="local weights file for --model (neither this nor --pretrained: "
                              "random init, smoke runs)")
    weights.add_argument("--pretrained", default=None, metavar="TAG",
                         help="open_clip pretrained tag for --model (openai, laion2b_s34b_b88k, "
                              "...): weights from open_clip's cache, downloaded when missing")
    group.add_argument("--cache-dir", default=None,
                       help="open_clip's download cache for --pretrained and hf-hub: models "
                            "(None: open_clip's default)")
    group.add_argument("--model-config", default=None,
                       help="register an open_clip architecture JSON first (its name is the stem)")
    group.add_argument("--shots", type=int, nargs="+", default=[16],
                       help="K training shots per class (several: one experiment each)")
    group.add_argument("--views", type=int, default=10,
                       help="augmented views cached per training image (each epoch sees one "
                            "view of every image, so the steps do not grow with it)")
    group.add_argument("--crop-scale", type=float, nargs=2, default=list(AUGMENT_SCALE),
                       metavar=("LOW", "HIGH"),
                       help="area range of the training views' random resized crops "
                            "(the released code's)")
    group.add_argument("--template", action="append", default=None,
                       help="prompt template with {} (repeat for an ensemble, or 'imagenet7'; "
                            "None: the dataset's CoOp template, or 'a photo of a {}.' with "
                            "--peft lora as CLIP-LoRA uses)")
    group.add_argument("--encoder-amp", choices=AMPS, default="auto",
                       help="the encoder's autocast on CUDA (auto = fp16), like train's --amp; "
                            "eval/score's --precision is the solver's")
    group.add_argument("--precision", dest="encoder_amp", choices=AMPS,
                       help=argparse.SUPPRESS)  # the name this option had: still read
    group.add_argument("--encode-batch-size", type=int, default=256,
                       help="crops per encoder call")
    group.add_argument("--workers", type=int, default=None,
                       help="image decoding processes (None: 8 on CUDA, 0 on CPU)")
    group.add_argument("--shard-size", type=int, default=1024, help="images per cache shard")
    group.add_argument("--on-error", choices=ON_ERROR, default="skip",
                       help="unreadable image: skip and count it, or stop")
    peft = parser.add_argument_group("PEFT feature source (features of a fine-tuned CLIP)")
    peft.add_argument("--peft", choices=PEFT_METHODS, default=None,
                      help="features from a CoOp, CoCoOp, CLIP-Adapter or CLIP-LoRA checkpoint "
                           "on top of --model (None: zero-shot CLIP)")
    peft.add_argument("--peft-checkpoint", default=None,
                      help="the PEFT checkpoint file, in that project's own format")
    peft.add_argument("--class-token-position", choices=CLASS_TOKEN_POSITIONS, default="end",
                      help="CoOp: where the class name sits in the prompt (files do not say)")


def check_before_work(args, seeds: list[int], context, backend: str | None = None) -> Path:
    """What can be checked before the dataset is read or the encoder built: repeated seeds or
    shot counts,
    the device, the solver backend (``run``) and the output folder."""
    for name, values in (("seeds", seeds), ("shots", args.shots)):
        if len(set(values)) != len(values):
            repeated = sorted({value for value in values if values.count(value) > 1})
            raise ValueError(f"{name} must differ: {' '.join(map(str, repeated))} given twice")
    check_crop_scale(args.crop_scale)
    if (args.peft is None) != (args.peft_checkpoint is None):
        raise ValueError("--peft and --peft-checkpoint go together")
    if args.peft_checkpoint is not None:
        problem = file_problem(args.peft_checkpoint)
        if problem:
            raise ValueError(f"cannot read --peft-checkpoint {args.peft_checkpoint}: {problem}")
    device = context.device(args.device)
    if backend is not None:
        options.check_backend(backend, device)
    return check_output_folder(options.require_out(args), "--out")


def input_settings(args) -> InputSettings:
    """The data and encoder options as the library's :class:`InputSettings`."""
    return InputSettings(
        dataset=args.dataset, model=args.model, root=args.root,
        allow_empty_classes=args.allow_empty_classes,
        allow_unnamed_classes=args.allow_unnamed_classes, checkpoint=args.checkpoint,
        pretrained=args.pretrained, cache_dir=args.cache_dir, model_config=args.model_config,
        precision=args.encoder_amp, templates=args.template, peft=args.peft,
        peft_checkpoint=args.peft_checkpoint, class_token_position=args.class_token_position,
        workers=args.workers,
    )


def extract_options(args) -> ExtractOptions:
    """The encoding options as the library's :class:`ExtractOptions`."""
    return ExtractOptions(views=args.views, crop_scale=tuple(args.crop_scale),
                          shard_size=args.shard_size, batch_size=args.encode_batch_size,
                          on_error=args.on_error, progress=not args.quiet)


def load_inputs(args, context) -> Inputs:
    """Dataset, encoder and templates from the shared options, described on rank 0."""
    # base-to-new: a shared context trained on the base classes serves every class
    strict = getattr(args, "subsample", "all") != "base-to-new"
    inputs = input_settings(args).load(context.device(args.device), strict_classes=strict)
    if context.is_main:
        print(inputs.describe(), flush=True)
    return inputs
