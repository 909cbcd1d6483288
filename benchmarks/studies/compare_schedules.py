"""Measure two settings of one fit option on synthetic tasks: fit(schedule="released") (the
default) against fit(schedule="warmup-cosine"), or fp32 training against amp="bf16" on the CPU.

For every shots value and seed both settings train on the same task from the same seed; the
script reports the test accuracy at the M chosen on the validation split, the paired
difference (first - second setting), the mean learning rate over each run's optimizer steps
and the steps per epoch, as Markdown tables (and optionally JSON).

    python benchmarks/studies/compare_schedules.py --shots 1 4 16 --seeds 1 2 3 4 5
    python benchmarks/studies/compare_schedules.py --compare amp --shots 4 16 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import fma_fast
from fma_fast.core.environment import cpu_name
from fma_fast.experiments.synthetic import make_task

VARIANTS = {"schedule": ("released", "warmup-cosine"), "amp": ("off", "bf16")}
"""The fit option compared and its two settings (the first is the difference's minuend)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="schedule",
                        help="the fit option whose two settings are compared")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--difficulty", type=float, default=0.6)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--noise", default="bridge")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the raw results here")
    return parser.parse_args(argv)


def run_one(task, setting: str, seed: int, args) -> dict:
    start = time.perf_counter()
    result = fma_fast.fit(
        task.train.features, task.train.labels, task.class_features,
        blocks=args.blocks, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        gamma=args.gamma, noise=args.noise, seed=seed, progress=False,
        **{args.compare: setting},
    )
    seconds = time.perf_counter() - start
    chosen = fma_fast.select_steps(
        result.model, task.val.features, task.val.labels, task.class_features
    ).best_steps
    test = fma_fast.accuracy_by_steps(
        result.model, task.test.features, task.test.labels, task.class_features
    )
    rates = result.learning_rates
    return {
        "setting": setting,
        "seed": seed,
        "chosen_steps": chosen,
        "accuracy": test[chosen],
        "zero_shot": test[0],
        "mean_lr": statistics.fmean(rates),
        "steps": len(rates),
        "steps_per_epoch": len(rates) // args.epochs,
        "path": result.config["path"],
        "seconds": seconds,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def table(shots: int, rows: list[dict], compare: str) -> str:
    first_name, second_name = VARIANTS[compare]
    by = {s: sorted((r for r in rows if r["setting"] == s), key=lambda r: r["seed"])
          for s in VARIANTS[compare]}
    first, second = by[first_name], by[second_name]
    diffs = [a["accuracy"] - b["accuracy"] for a, b in zip(first, second, strict=True)]
    ratio = statistics.fmean(r["mean_lr"] for r in first) / statistics.fmean(
        r["mean_lr"] for r in second)
    lines = [
        f"### shots = {shots} ({first[0]['steps_per_epoch']} steps/epoch, "
        f"{first[0]['steps']} steps, n = {len(diffs)} seeds)",
        "",
        f"| {compare} | test acc at val-chosen M (mean ± std) | zero-shot (M=0) | chosen M "
        "| mean LR | fit s |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in by.items():
        acc_mean, acc_std = _mean_std([r["accuracy"] for r in runs])
        zero = statistics.fmean(r["zero_shot"] for r in runs)
        chosen = ", ".join(str(r["chosen_steps"]) for r in runs)
        lines.append(
            f"| {name} | {100 * acc_mean:.2f} ± {100 * acc_std:.2f} | {100 * zero:.2f} "
            f"| {chosen} | {statistics.fmean(r['mean_lr'] for r in runs):.3e} "
            f"| {statistics.fmean(r['seconds'] for r in runs):.1f} |"
        )
    diff_mean, diff_std = _mean_std(diffs)
    se = diff_std / math.sqrt(len(diffs))
    lines += [
        "",
        f"Paired difference {first_name} − {second_name}: {100 * diff_mean:+.2f} ± "
        f"{100 * diff_std:.2f} pp (std; standard error {100 * se:.2f} pp; per seed "
        + ", ".join(f"{100 * d:+.2f}" for d in diffs)
        + f"). Mean LR ratio {first_name} / {second_name}: {ratio:.4f}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {cpu_name()}, "
          f"{args.threads} thread(s); classes={args.classes} dim={args.dim} "
          f"blocks={args.blocks} difficulty={args.difficulty} epochs={args.epochs} "
          f"batch={args.batch_size} lr={args.lr} gamma={args.gamma} noise={args.noise}",
          flush=True)
    results: dict[int, list[dict]] = {}
    start = time.perf_counter()
    for shots in args.shots:
        results[shots] = []
        for seed in args.seeds:
            task = make_task(
                num_classes=args.classes, dim=args.dim, shots=shots,
                test_per_class=args.test_per_class, difficulty=args.difficulty, seed=seed,
            )
            for setting in VARIANTS[args.compare]:
                row = run_one(task, setting, seed, args)
                results[shots].append(row)
                print(f"  shots={shots} seed={seed} {setting}: acc={row['accuracy']:.4f} "
                      f"M={row['chosen_steps']} ({row['seconds']:.1f}s)", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f}s\n")
    for shots, rows in results.items():
        print(table(shots, rows, args.compare) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results},
                      handle, indent=1)


if __name__ == "__main__":
    main()
