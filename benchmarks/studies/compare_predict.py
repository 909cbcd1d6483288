"""``predict`` against ``extract`` + ``score`` on the same images: images/s on this CPU, and
where the time goes (decode, encode, solve).

One process: a random-init open_clip encoder (``--model``, ViT-B-32 by default: no weights
are downloaded, the speed does not depend on them), a random FMA field (D = the encoder's
width, 12 blocks, M=10) and ``--classes`` random classes, ``--images`` generated JPEGs of
500x375 (a typical photo of the few-shot datasets). Each round times, at 1 and 2 threads,
interleaved:

- ``predict``: :func:`fma_fast.clip.predict_images` into a fresh folder (decode threads =
  torch threads);
- ``extract + score``: :func:`fma_fast.clip.extract_split` of the images into a fresh cache
  folder (extract's CPU default: decoding in the main process) then :func:`fma_fast.score` of
  that folder, one after the other;
- the stages alone: decoding + preprocessing every image (one thread), encoding the
  preprocessed pixels in batches of 256, solving the features.

Prints markdown tables of medians and the machine and load lines:

    python benchmarks/studies/compare_predict.py [--model ViT-B-32] [--images 192]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fma_fast
from fma_fast import VelocityNet
from fma_fast.clip import Dataset, FewShotClassifier, Item, extract_split, load_encoder
from fma_fast.clip.images import ImageEntry, decode
from fma_fast.core.environment import aten_isa, cpu_name

STEPS, BLOCKS, BATCH = 10, 12, 256


def _images(folder: Path, count: int) -> list[Path]:
    """Smooth colour gradients with mild noise, saved as JPEG 500x375 (quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    ys, xs = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(count):
        colour = rng.uniform(0, 255, (3, 3))
        pixels = (colour[:, 0] + colour[:, 1] * xs[..., None] / 500
                  + colour[:, 2] * ys[..., None] / 375) / 2 + rng.normal(0, 12, (375, 500, 3))
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _classifier(model: str, classes: int) -> FewShotClassifier:
    encoder = load_encoder(model, device="cpu")
    dim = encoder.model.visual.output_dim
    field = VelocityNet(dim, blocks=BLOCKS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in field.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    table = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    return FewShotClassifier(encoder=encoder, field=field, class_features=table,
                             class_names=[f"class {c}" for c in range(classes)],
                             templates=["a photo of a {}."], steps=STEPS)


def _predict(classifier, folder: Path, scratch: Path, threads: int) -> float:
    out = scratch / "predict"
    start = time.perf_counter()
    fma_fast.clip.predict_images(classifier, [folder], out, workers=threads, progress=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def _extract_score(classifier, dataset: Dataset, scratch: Path) -> tuple[float, float]:
    cache, out = scratch / "cache", scratch / "score"
    start = time.perf_counter()
    extract_split(classifier.encoder, dataset, dataset.test, "test", cache, batch_size=BATCH,
                  workers=0, progress=False)
    middle = time.perf_counter()
    fma_fast.score(classifier.field, [cache], classifier.class_features, out, steps=STEPS,
                   progress=False)
    end = time.perf_counter()
    shutil.rmtree(cache)
    shutil.rmtree(out)
    return middle - start, end - middle


def _stages(classifier, paths: list[Path]) -> tuple[float, float, float]:
    preprocess = classifier.preprocess
    start = time.perf_counter()
    pixels = [decode(ImageEntry(str(p), p, None), preprocess).pixels for p in paths]
    decoded = time.perf_counter()
    features = torch.cat([classifier.encoder.encode_images(torch.stack(pixels[i:i + BATCH]))
                          for i in range(0, len(pixels), BATCH)])
    encoded = time.perf_counter()
    classifier.solve(features)
    solved = time.perf_counter()
    return decoded - start, encoded - decoded, solved - encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random)")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    classifier = _classifier(args.model, args.classes)
    with tempfile.TemporaryDirectory(prefix="fma-fast-predict-bench-") as temp:
        scratch = Path(temp)
        folder = scratch / "images"
        paths = _images(folder, args.images)
        dataset = Dataset("bench", folder, classifier.class_names, "a photo of a {}.", [], None,
                          [Item(p.name, 0) for p in paths])
        _stages(classifier, paths[:8])  # warm-up: first calls allocate and plan
        load_start = os.getloadavg()
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs = {"predict": _predict(classifier, folder, scratch, threads)}
                runs["extract"], runs["score"] = _extract_score(classifier, dataset, scratch)
                runs["extract + score"] = runs["extract"] + runs["score"]
                runs["decode"], runs["encode"], runs["solve"] = _stages(classifier, paths)
                for name, seconds in runs.items():
                    times.setdefault((name, threads), []).append(seconds)
        load_end = os.getloadavg()
    n = args.images
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, ATen ISA {aten_isa()}; "
          f"torch {torch.__version__}")
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}")
    print(f"encoder {args.model} (random init, fp32), field D="
          f"{classifier.field.dim} x {BLOCKS} blocks, M={STEPS}, {args.classes} classes, "
          f"{n} JPEGs 500x375; {args.rounds} interleaved rounds, medians\n")
    print("| threads | predict images/s | extract + score images/s | predict / (extract + "
          "score) | all rounds, s (predict; extract + score) |")
    print("|---|---|---|---|---|")
    for threads in (1, 2):
        p = statistics.median(times["predict", threads])
        e = statistics.median(times["extract + score", threads])
        rounds = "; ".join(" ".join(f"{s:.1f}" for s in times[name, threads])
                           for name in ("predict", "extract + score"))
        print(f"| {threads} | {n / p:.1f} | {n / e:.1f} | {e / p:.2f}x | {rounds} |")
    print("\n| threads | decode (1 thread) | encode | solve | sum of stages | extract | score |")
    print("|---|---|---|---|---|---|---|")
    for threads in (1, 2):
        cells = [statistics.median(times[name, threads])
                 for name in ("decode", "encode", "solve")]
        extract = statistics.median(times["extract", threads])
        score = statistics.median(times["score", threads])
        shares = " | ".join(f"{1000 * s / n:.2f} ms/img ({100 * s / sum(cells):.0f}%)"
                            for s in cells)
        print(f"| {threads} | {shares} | {1000 * sum(cells) / n:.2f} ms/img | "
              f"{1000 * extract / n:.2f} ms/img | {1000 * score / n:.2f} ms/img |")


if __name__ == "__main__":
    main()
