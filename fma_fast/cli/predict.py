"""``fma-fast predict``: classify folders, lists or CSVs of images with a classifier folder
(:func:`fma_fast.clip.predict_images`) into resumable top-k outputs with the image paths;
split over torchrun ranks by part."""

from __future__ import annotations

import sys
import warnings

from ..batch.writers import FORMATS
from ..clip.cache import ON_ERROR
from ..clip.classifier import ENCODE_BATCH
from ..core.names import AMPS, BACKENDS, PRECISIONS
from ..core.policy import DECODE_THREADS, PREDICT_PART_IMAGES
from . import options

BAD_SHOWN = 5
"""Undecodable images named on stderr (all of them are in manifest.json)."""


def run(args) -> None:
    from ..clip import FewShotClassifier, launch, predict_images

    with launch() as context:
        device = context.device(args.device)
        if args.backend is not None:
            options.check_backend(args.backend, device)
        out = options.require_out(args)
        classifier = FewShotClassifier.load(
            args.classifier, checkpoint_file=args.checkpoint,
            peft_checkpoint=args.peft_checkpoint, cache_dir=args.cache_dir, device=device,
            precision=args.encoder_precision)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = predict_images(
                classifier, args.inputs, out, topk=args.topk, output_format=args.format,
                on_bad_image=args.on_bad_image, encode_batch_size=args.encode_batch_size,
                part_images=args.part_size, workers=args.workers, precision=args.precision,
                backend=args.backend, progress=not args.quiet, context=context)
        if not context.is_main:
            return
        for path, problem in summary.bad_images[:BAD_SHOWN]:
            print(f"fma-fast predict: skipped undecodable image {path}: {problem}",
                  file=sys.stderr)
        for warning in caught:
            print(f"fma-fast predict: warning: {warning.message}", file=sys.stderr)
        print(summary.line(), flush=True)


def register(commands) -> None:
    parser = commands.add_parser(
        "predict", help="classify folders, lists or CSVs of images with a classifier folder "
                        "(resumable)", formatter_class=options.Formatter)
    parser.add_argument("classifier", help="classifier folder written by 'run' (classifiers/"
                                           "k<K>-seed<S>) or FewShotClassifier.save")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="folder of images (recursive; labelled when every image is in a "
                             "folder named after a class), .txt list of image paths, or .csv "
                             "with a 'path' and an optional 'label' (class name) column")
    options.add_out(parser, "output folder: parts, their records and manifest.json")
    parser.add_argument("--topk", type=int, default=1, help="classes kept per image")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="output format (csv/jsonl, with class names, for small jobs)")
    parser.add_argument("--on-bad-image", choices=ON_ERROR, default="skip",
                        help="an image that cannot be read or decoded: skip it (listed in "
                             "manifest.json) or stop")
    parser.add_argument("--encode-batch-size", type=int, default=ENCODE_BATCH,
                        help="images decoded and encoded at a time")
    parser.add_argument("--part-size", type=int, default=PREDICT_PART_IMAGES,
                        help="images per output part (the unit written and resumed)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"image decoding threads (None: up to {DECODE_THREADS}, one per "
                             "core)")
    weights = parser.add_argument_group("where the classifier's encoder comes from (as "
                                        "recorded, unless moved)")
    weights.add_argument("--checkpoint", default=None,
                         help="the encoder's weights file, when it moved since the fit (its "
                              "sha256 must be the recorded one)")
    weights.add_argument("--peft-checkpoint", default=None,
                         help="the PEFT checkpoint file, when it moved since the fit")
    weights.add_argument("--cache-dir", default=None,
                         help="open_clip's download cache for a classifier fitted with "
                              "--pretrained (None: open_clip's default)")
    weights.add_argument("--encoder-precision", choices=AMPS, default="auto",
                         help="encoder autocast on CUDA (auto = fp16); the CPU runs fp32")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="solver GEMM precision (None: as fitted)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="solver path (None: as fitted)")
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
