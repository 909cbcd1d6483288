"""Measure solver-aware refinement (``fma_fast.refine``) against flow matching alone on
synthetic tasks.

For every shots value, difficulty and seed: one task (``synthetic.make_task``), one field
fitted by ``fit`` (FM), M chosen on the validation split, the test accuracy at that M (FM
alone); then each refinement variant continues that field at that M (``refine``), M is chosen
on the validation split again, and the test accuracy is read there (FM + refinement). Where
validation chooses M=0 the field is not used and there is nothing to refine: the variant's
accuracy is FM's (counted in the tables). Reports, per shots × difficulty, the mean ± sample
std over seeds of both accuracies and their paired difference (variant − FM) with its
standard error and the number of seeds it won/lost, as Markdown (and optionally JSON).

    python benchmarks/studies/compare_refinement.py --shots 1 4 16 --difficulties 0.3 0.6 0.9 \\
        --seeds 1 2 3 4 5 --json refinement.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import fma_fast
from fma_fast.core.environment import cpu_name
from fma_fast.experiments.synthetic import make_task

VARIANTS = {
    "refine": {},
    "refine-lr1e-4": {"lr": 1e-4},
    "refine-all-steps": {"all_steps": True},
}
"""Refinement variants: ``refine``'s defaults, a 5x learning rate, and the loss averaged over
every state x_1..x_M (``step_weights`` all 1) instead of x_M alone."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--difficulties", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=list(VARIANTS))
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--refine-epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the raw results here")
    return parser.parse_args(argv)


def _chosen_accuracy(model, task, max_steps: int) -> tuple[int, float, float]:
    """(M chosen on val, test accuracy there, test accuracy at M=0)."""
    chosen = fma_fast.select_steps(model, task.val.features, task.val.labels,
                                   task.class_features, max_steps=max_steps).best_steps
    test = fma_fast.accuracy_by_steps(model, task.test.features, task.test.labels,
                                      task.class_features, max_steps=max_steps)
    return chosen, test[chosen], test[0]


def run_task(shots: int, difficulty: float, seed: int, args) -> dict:
    task = make_task(num_classes=args.classes, dim=args.dim, shots=shots,
                     test_per_class=args.test_per_class, difficulty=difficulty, seed=seed)
    start = time.perf_counter()
    fitted = fma_fast.fit(task.train.features, task.train.labels, task.class_features,
                          blocks=args.blocks, epochs=args.epochs, lr=args.lr, gamma=args.gamma,
                          seed=seed, progress=False)
    chosen, accuracy, zero_shot = _chosen_accuracy(fitted.model, task, args.max_steps)
    row = {"shots": shots, "difficulty": difficulty, "seed": seed, "zero_shot": zero_shot,
           "fm": {"steps": chosen, "accuracy": accuracy,
                  "seconds": time.perf_counter() - start}}
    for name in args.variants:
        settings = dict(VARIANTS[name])
        if chosen == 0:
            row[name] = {"steps": 0, "accuracy": accuracy, "refined": False, "seconds": 0.0}
            continue
        if settings.pop("all_steps", False):
            settings["step_weights"] = [1.0] * chosen
        start = time.perf_counter()
        refined = fma_fast.refine(fitted.model, task.train.features, task.train.labels,
                                  task.class_features, steps=chosen, epochs=args.refine_epochs,
                                  seed=seed, progress=False, **settings)
        steps, refined_accuracy, _ = _chosen_accuracy(refined.model, task, args.max_steps)
        row[name] = {"steps": steps, "accuracy": refined_accuracy, "refined": True,
                     "trained_at": chosen, "loss": [refined.history[0], refined.history[-1]],
                     "seconds": time.perf_counter() - start}
    return row


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{100 * statistics.fmean(values):.2f} ± {100 * std:.2f}"


def table(rows: list[dict], variants: list[str]) -> str:
    lines = [
        "| shots | difficulty | zero-shot (M=0) | FM at val M | variant | FM + variant at val M "
        "| paired diff (pp) mean ± std | s.e. | won/tied/lost | refined | M FM → variant |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(r["shots"], r["difficulty"]) for r in rows})
    for shots, difficulty in cells:
        group = sorted((r for r in rows if (r["shots"], r["difficulty"]) == (shots, difficulty)),
                       key=lambda r: r["seed"])
        fm = [r["fm"]["accuracy"] for r in group]
        for name in variants:
            ours = [r[name]["accuracy"] for r in group]
            diffs = [a - b for a, b in zip(ours, fm, strict=True)]
            std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            se = std / math.sqrt(len(diffs))
            won = sum(d > 0 for d in diffs)
            lost = sum(d < 0 for d in diffs)
            steps = ", ".join(f"{r['fm']['steps']}→{r[name]['steps']}" for r in group)
            lines.append(
                f"| {shots} | {difficulty:g} | {_mean_std([r['zero_shot'] for r in group])} "
                f"| {_mean_std(fm)} | {name} | {_mean_std(ours)} "
                f"| {100 * statistics.fmean(diffs):+.2f} ± {100 * std:.2f} | {100 * se:.2f} "
                f"| {won}/{len(diffs) - won - lost}/{lost} "
                f"| {sum(r[name]['refined'] for r in group)}/{len(group)} | {steps} |")
    return "\n".join(lines)


def pooled(rows: list[dict], variants: list[str]) -> str:
    """Per variant: the paired difference over every (shots, difficulty, seed) task."""
    lines = []
    for name in variants:
        diffs = [r[name]["accuracy"] - r["fm"]["accuracy"] for r in rows]
        std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        lines.append(f"- {name}: {100 * statistics.fmean(diffs):+.2f} ± {100 * std:.2f} pp over "
                     f"{len(diffs)} tasks (s.e. {100 * std / math.sqrt(len(diffs)):.2f}); won "
                     f"{sum(d > 0 for d in diffs)}, lost {sum(d < 0 for d in diffs)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {cpu_name()}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}; classes={args.classes} "
          f"dim={args.dim} blocks={args.blocks} epochs={args.epochs} lr={args.lr} "
          f"gamma={args.gamma} refine_epochs={args.refine_epochs} variants={args.variants}",
          flush=True)
    rows = []
    start = time.perf_counter()
    for shots in args.shots:
        for difficulty in args.difficulties:
            for seed in args.seeds:
                row = run_task(shots, difficulty, seed, args)
                rows.append(row)
                parts = ", ".join(f"{name} {100 * row[name]['accuracy']:.1f} (M="
                                  f"{row[name]['steps']})" for name in args.variants)
                print(f"  shots={shots} difficulty={difficulty:g} seed={seed}: FM "
                      f"{100 * row['fm']['accuracy']:.1f} (M={row['fm']['steps']}), {parts}; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f}s\n")
    print(table(rows, args.variants) + "\n")
    print(pooled(rows, args.variants))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
