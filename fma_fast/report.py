"""Evaluation report: FMA against few-shot baselines over shots, seeds and feature sets.

For each feature set (synthetic tasks at several difficulties, or train/val/test feature files
from the CLIP pipeline), each K and each seed: sample K shots per class from the train pool and
min(K, 4) from the val pool (the literature's protocol), fit every method, choose its
hyper-parameters on val, and score the full test split. Writes a markdown summary, the raw
numbers as JSON and (with matplotlib, the ``plot`` extra) two PNG plots, all atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, synthetic
from . import _validation as check
from ._io import atomic_write, check_output_folder
from .adaptive import adaptive_predict, select_rule, trajectory_stats
from .baselines import (
    FMA,
    Baseline,
    ClipAdapter,
    LinearProbe,
    Pipeline,
    TipAdapter,
    TipAdapterF,
    ZeroShot,
)
from .features_io import check_feature_files, load_features
from .reference import flow_matching_loss

VAL_SHOTS_CAP = 4
METHODS = (
    "zero-shot",
    "FMA",
    "FMA adaptive",
    "linear probe",
    "linear probe on FMA",
    "CLIP-Adapter",
    "CLIP-Adapter + FMA",
    "Tip-Adapter",
    "Tip-Adapter on FMA",
    "Tip-Adapter-F",
)
PLOTTED = (
    "zero-shot",
    "FMA",
    "linear probe",
    "CLIP-Adapter",
    "CLIP-Adapter + FMA",
    "Tip-Adapter",
)


@dataclass
class ReportSettings:
    """What the report runs. FMA's epochs are raised for small K so that every fit gets at
    least ``min_updates`` optimizer steps (a 1-shot, 20-class split is one batch per epoch)."""

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    difficulties: tuple[float, ...] = (0.25, 0.6, 0.9)
    classes: int = 20
    dim: int = 256
    test_per_class: int = 50
    data_seed: int = 0
    blocks: int = 2
    epochs: int = 240
    min_updates: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    gamma: float = 0.05
    max_steps: int = 10
    step_size: float = 0.1
    convergence_check: bool = True
    features: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        self.shots = _positive_ints("shots", self.shots, minimum=1)
        self.seeds = _positive_ints("seeds", self.seeds, minimum=0)
        if self.features is None:
            if not self.difficulties:
                raise ValueError("difficulties must name at least one difficulty in [0, 1]")
            for difficulty in self.difficulties:
                if not 0.0 <= difficulty <= 1.0:
                    raise ValueError(f"difficulties must lie in [0, 1], got {difficulty}")
        for name in ("classes", "dim", "test_per_class", "blocks", "epochs", "batch_size"):
            check.check_int(name, getattr(self, name), minimum=1)
        check.check_int("min_updates", self.min_updates, minimum=0)
        check.check_int("data_seed", self.data_seed, minimum=0)
        check.check_int("max_steps", self.max_steps, minimum=1)
        for name in ("lr", "step_size"):
            check.check_positive_float(name, getattr(self, name))
        check.check_positive_float("gamma", self.gamma, allow_zero=True)
        if self.max_steps * self.step_size > 1.0 + 1e-9:
            raise ValueError(
                f"max_steps * step_size must be <= 1 (FMA stops by t=1), "
                f"got {self.max_steps} * {self.step_size}"
            )

    def fma_epochs(self, rows: int) -> int:
        """Epochs for a train split of ``rows``: ``epochs``, raised to reach ``min_updates``."""
        per_epoch = math.ceil(rows / self.batch_size)
        return max(self.epochs, math.ceil(self.min_updates / per_epoch))

    def command(self, out: str, name: str) -> str:
        """The ``fma-fast report`` command line that reproduces these settings."""
        parts = ["fma-fast", "report", "--out", out, "--name", name]
        if self.features is not None:
            parts += ["--train", self.features[0], "--val", self.features[1]]
            parts += ["--test", self.features[2]]
        else:
            parts += ["--difficulties", *map(str, self.difficulties)]
            parts += ["--classes", str(self.classes), "--dim", str(self.dim)]
            parts += ["--test-per-class", str(self.test_per_class)]
            parts += ["--data-seed", str(self.data_seed)]
        parts += ["--shots", *map(str, self.shots), "--seeds", *map(str, self.seeds)]
        for option in ("blocks", "epochs", "min_updates", "batch_size", "lr", "gamma"):
            parts += [f"--{option.replace('_', '-')}", str(getattr(self, option))]
        parts += ["--max-steps", str(self.max_steps), "--step-size", str(self.step_size)]
        if not self.convergence_check:
            parts.append("--skip-convergence-check")
        return shlex.join(parts)


def _positive_ints(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of ints, got {values!r}")
    return tuple(check.check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values))


@dataclass
class Pool:
    """A labelled split to draw shots from (or score on)."""

    features: torch.Tensor
    labels: torch.Tensor


@dataclass
class FeatureSetPools:
    name: str
    train: Pool
    val: Pool
    test: Pool
    class_features: torch.Tensor


def few_shot_indices(labels: torch.Tensor, shots: int, generator: torch.Generator) -> torch.Tensor:
    """``shots`` random rows of every class (sorted by class); a class with fewer is an error."""
    labels = check.as_tensor("labels", labels)
    chosen = []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().flatten()
        if rows.numel() < shots:
            raise ValueError(f"class {c} has {rows.numel()} rows in the pool, fewer than {shots}")
        chosen.append(rows[torch.randperm(rows.numel(), generator=generator)[:shots]])
    return torch.cat(chosen)


def synthetic_pools(settings: ReportSettings, difficulty: float) -> FeatureSetPools:
    """One fixed synthetic data set per difficulty (from ``data_seed``); seeds vary the shots
    drawn from it and the methods' initialisations, as seeds do in the literature."""
    task = synthetic.make_task(
        num_classes=settings.classes,
        dim=settings.dim,
        shots=max(settings.shots),
        val_shots=VAL_SHOTS_CAP,
        test_per_class=settings.test_per_class,
        difficulty=difficulty,
        seed=settings.data_seed,
    )
    return FeatureSetPools(
        name=f"synthetic d={difficulty:g}",
        train=Pool(task.train.features, task.train.labels),
        val=Pool(task.val.features, task.val.labels),
        test=Pool(task.test.features, task.test.labels),
        class_features=task.class_features,
    )


def file_pools(train: str, val: str, test: str) -> FeatureSetPools:
    """Pools from three feature files (``fma-fast synth`` or the CLIP pipeline) sharing one
    class table."""
    sets = {
        name: load_features(path, require_labels=True)
        for name, path in (("train", train), ("val", val), ("test", test))
    }
    check_feature_files(sets)
    table = sets["train"].class_features.float()
    pools = {name: Pool(s.features.float(), s.labels) for name, s in sets.items()}
    return FeatureSetPools(
        name=Path(train).resolve().parent.name or "features",
        class_features=table,
        **pools,
    )


@torch.no_grad()
def straight_line_loss(model, features, labels, class_features, points: int = 10) -> float:
    """Noise-free flow-matching loss on a fixed grid of t in (0, 1): a deterministic measure of
    how well the field fits the straight lines, comparable between fits (the training loss is
    a noisy single-sample estimate)."""
    z = class_features[labels]
    total = 0.0
    for t in torch.linspace(0.05, 0.95, points).tolist():
        x_t = (1 - t) * features + t * z
        time_column = torch.full((features.shape[0], 1), t)
        total += float(flow_matching_loss(model(x_t, time_column), z - features))
    return total / points


def _fma(settings: ReportSettings, seed: int, rows: int, epoch_factor: int = 1) -> FMA:
    return FMA(
        blocks=settings.blocks,
        epochs=epoch_factor * settings.fma_epochs(rows),
        gamma=settings.gamma,
        max_steps=settings.max_steps,
        step_size=settings.step_size,
        seed=seed,
        lr=settings.lr,
        batch_size=settings.batch_size,
    )


def draw(pools: FeatureSetPools, shots: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The K-shot train split and min(K, 4)-shot val split of ``seed``: (x, y, val_x, val_y)."""
    generator = torch.Generator().manual_seed(seed)
    train_rows = few_shot_indices(pools.train.labels, shots, generator)
    val_rows = few_shot_indices(pools.val.labels, min(shots, VAL_SHOTS_CAP), generator)
    return (
        pools.train.features[train_rows],
        pools.train.labels[train_rows],
        pools.val.features[val_rows],
        pools.val.labels[val_rows],
    )


def _fit_diagnostics(fma: FMA, x, y, vx, vy, test_curve: list[float]) -> dict:
    """How well one FMA fit fits (noise-free line losses) and scores (test at M chosen, M=max)."""
    z = fma.class_features
    return {
        "epochs": fma.fit_result.config["epochs"],
        "updates": fma.fit_result.config["epochs"]
        * math.ceil(len(y) / fma.fit_options["batch_size"]),
        "steps": fma.steps,
        "train_line_loss": straight_line_loss(fma.model, x, y, z),
        "val_line_loss": straight_line_loss(fma.model, vx, vy, z),
        "test_accuracy_chosen_m": test_curve[fma.steps],
        "test_accuracy_max_m": test_curve[-1],
    }


def run_one(pools: FeatureSetPools, shots: int, seed: int, settings: ReportSettings) -> dict:
    """Every method on one K-shot draw: test accuracies, choices made on val, seconds."""
    x, y, vx, vy = draw(pools, shots, seed)
    tx, ty, z = pools.test.features, pools.test.labels, pools.class_features
    accuracy: dict[str, float] = {}
    chosen: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def run(name: str, method: Baseline) -> Baseline:
        start = time.perf_counter()
        method.fit(x, y, z, vx, vy)
        accuracy[name] = method.accuracy(tx, ty)
        seconds[name] = time.perf_counter() - start
        chosen[name] = dict(method.selection)
        return method

    run("zero-shot", ZeroShot())
    run("linear probe", LinearProbe())
    adapter = run("CLIP-Adapter", ClipAdapter(seed=seed))
    run("Tip-Adapter", TipAdapter())
    run("Tip-Adapter-F", TipAdapterF())

    start = time.perf_counter()
    fma = _fma(settings, seed, len(y)).fit(x, y, z, vx, vy)
    seconds["FMA"] = time.perf_counter() - start
    options = {"max_steps": settings.max_steps, "step_size": settings.step_size}
    val_stats = trajectory_stats(fma.model, vx, z, **options)
    test_stats = trajectory_stats(fma.model, tx, z, **options)
    test_curve = test_stats.fixed_accuracy(ty)
    accuracy["FMA"] = test_curve[fma.steps]
    chosen["FMA"] = dict(fma.selection)
    rule = select_rule(val_stats, vy)
    pred, stop = adaptive_predict(test_stats, rule.rule)
    accuracy["FMA adaptive"] = float((pred == ty).double().mean())
    chosen["FMA adaptive"] = {
        "rule": str(rule.rule),
        "test_mean_steps": float(stop.double().mean()),
    }
    run("linear probe on FMA", Pipeline(fma, LinearProbe(), fit_first=False))
    run("Tip-Adapter on FMA", Pipeline(fma, TipAdapter(), fit_first=False))

    start = time.perf_counter()
    adapted_fma = _fma(settings, seed, len(y))
    stacked = Pipeline(adapter, adapted_fma, fit_first=False).fit(x, y, z, vx, vy)
    accuracy["CLIP-Adapter + FMA"] = stacked.accuracy(tx, ty)
    seconds["CLIP-Adapter + FMA"] = time.perf_counter() - start
    chosen["CLIP-Adapter + FMA"] = dict(stacked.selection)
    adapted_curve = trajectory_stats(
        adapted_fma.model, adapter.transform(tx), z, **options
    ).fixed_accuracy(ty)

    history = fma.fit_result.history
    return {
        "dataset": pools.name,
        "shots": shots,
        "seed": seed,
        "accuracy": accuracy,
        "chosen": chosen,
        "seconds": seconds,
        "fma": {
            "fit": _fit_diagnostics(fma, x, y, vx, vy, test_curve),
            "val_by_steps": fma.steps_selection.accuracy,
            "test_by_steps": test_curve,
            "adapter_test_by_steps": adapted_curve,
            "adaptive_val_accuracy": rule.accuracy,
            "loss_first_epoch": history[0],
            "loss_last_epoch": history[-1],
        },
    }


def convergence_check(pools: FeatureSetPools, settings: ReportSettings, base: dict) -> dict:
    """Refit the FMA of run ``base`` with twice the epochs: if the noise-free losses and the
    test accuracy barely move, the report's training budget has plateaued."""
    shots, seed = base["shots"], base["seed"]
    x, y, vx, vy = draw(pools, shots, seed)
    fma = _fma(settings, seed, len(y), epoch_factor=2).fit(x, y, pools.class_features, vx, vy)
    curve = trajectory_stats(
        fma.model,
        pools.test.features,
        pools.class_features,
        max_steps=settings.max_steps,
        step_size=settings.step_size,
    ).fixed_accuracy(pools.test.labels)
    fits = [
        base["fma"]["fit"],
        _fit_diagnostics(fma, x, y, vx, vy, curve),
    ]
    return {"dataset": pools.name, "shots": shots, "seed": seed, "fits": fits}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> dict:
    """Per feature set and K: mean and std over seeds of every method and of FMA's test
    accuracy per M; paired FMA-minus-baseline differences."""
    summary: dict[str, Any] = {}
    for run in runs:
        summary.setdefault(run["dataset"], {}).setdefault(run["shots"], []).append(run)
    out: dict[str, Any] = {}
    for dataset, by_shots in summary.items():
        out[dataset] = {}
        for shots, group in sorted(by_shots.items()):
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in group], "methods": {}}
            for method in METHODS:
                entry["methods"][method] = _stats([r["accuracy"][method] for r in group])
            for key in ("test_by_steps", "val_by_steps", "adapter_test_by_steps"):
                columns = list(zip(*(r["fma"][key] for r in group)))
                entry[key] = [_stats(col) for col in columns]
            entry["chosen_steps"] = [r["fma"]["fit"]["steps"] for r in group]
            entry["adaptive_rules"] = [r["chosen"]["FMA adaptive"]["rule"] for r in group]
            entry["adaptive_mean_steps"] = _stats(
                [r["chosen"]["FMA adaptive"]["test_mean_steps"] for r in group]
            )
            entry["paired"] = {
                f"{a} - {b}": _stats([r["accuracy"][a] - r["accuracy"][b] for r in group])
                for a, b in PAIRS
            }
            entry["fma_epochs"] = group[0]["fma"]["fit"]["epochs"]
            entry["fma_updates"] = group[0]["fma"]["fit"]["updates"]
            out[dataset][shots] = entry
    return out


PAIRS = (
    ("FMA", "zero-shot"),
    ("FMA", "linear probe"),
    ("FMA", "CLIP-Adapter"),
    ("CLIP-Adapter + FMA", "CLIP-Adapter"),
    ("CLIP-Adapter + FMA", "linear probe"),
    ("FMA adaptive", "FMA"),
    ("linear probe on FMA", "linear probe"),
    ("Tip-Adapter on FMA", "Tip-Adapter"),
)


def _pct(mean: float, std: float | None = None) -> str:
    text = f"{100 * mean:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


def _signed(mean: float, std: float) -> str:
    return f"{100 * mean:+.1f} ± {100 * std:.1f}"


def _verdict(mean: float, std: float) -> str:
    if abs(mean) <= std or abs(mean) < 0.0005:
        return "tie, within seed spread"
    return "ahead" if mean > 0 else "behind"


def _curve_shape(curve: list[tuple[float, float]]) -> str:
    """Read the mean test curve: a fall counts when the peak exceeds the last M by more than
    the seed spread at the last M."""
    means = [m for m, _ in curve]
    last = len(means) - 1
    peak = max(range(len(means)), key=lambda m: (means[m], -m))
    spread = max(curve[-1][1], 0.0005)
    if peak == 0:
        return "no gain from transport (best at M=0)"
    if peak < last and means[peak] - means[-1] > spread:
        return (
            f"rise then fall: peak {_pct(means[peak])} at M={peak}, {_pct(means[-1])} at M={last}"
        )
    if peak < last:
        return f"rise then flat: peak at M={peak}, M={last} within seed spread"
    return f"rises to M={last}"


def environment() -> dict[str, str]:
    """Versions and machine, recorded at the top of the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        import matplotlib

        mpl = matplotlib.__version__
    except ImportError:
        mpl = "not installed"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}, "
        + ("CUDA available (not used)" if torch.cuda.is_available() else "no GPU"),
        "platform": platform.platform(),
        # 1/5/15-minute load at the end: above the core count, other jobs shared the CPU.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fma_fast": __version__,
        "matplotlib": mpl,
    }


def render_markdown(result: dict) -> str:
    """The human-readable report; every number in it comes from ``result``."""
    settings, env, agg = result["settings"], result["environment"], result["aggregate"]
    shots = settings["shots"]
    lines = [
        f"# FMA vs few-shot baselines: {result['name']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {env['machine']} ({env['platform']})",
        f"- date: {env['date']}; wall time {result['seconds'] / 60:.1f} min"
        + (
            f" (load average over the last 1/5/15 min at the end: "
            f"{' / '.join(f'{v:.1f}' for v in env['load_average'])})"
            if env.get("load_average")
            else ""
        ),
        f"- versions: fma_fast {env['fma_fast']}, Python {env['python']}, torch {env['torch']}, "
        f"numpy {env['numpy']}, matplotlib {env['matplotlib']}",
        f"- protocol: K shots per class from the train pool and min(K, {VAL_SHOTS_CAP}) from the "
        f"val pool per seed; every hyper-parameter (FMA's M, the adaptive rule, regularisation, "
        f"α, β) chosen on val; accuracy on the full test split, mean ± std (n-1) over seeds "
        f"{', '.join(map(str, settings['seeds']))}.",
        f"- FMA: {settings['blocks']} blocks, width = dim, AdamW lr {settings['lr']:g} (released: "
        f"2e-4), batch {settings['batch_size']} (released: 32), "
        f"bridge noise γ={settings['gamma']:g}, "
        f"{settings['epochs']} epochs raised to ≥ {settings['min_updates']} updates for small K, "
        f"M ≤ {settings['max_steps']} steps of h={settings['step_size']:g}.",
    ]
    if settings["features"] is None:
        lines.append(
            f"- data: `fma_fast.synthetic.make_task`, {settings['classes']} classes, "
            f"D={settings['dim']}, {settings['test_per_class']} test rows per class, "
            f"data seed {settings['data_seed']} (one fixed data set per difficulty)."
        )
    else:
        lines.append(f"- data: feature files {', '.join(settings['features'])}")
    lines += [
        "",
        "Methods: zero-shot = cosine to class texts (FMA's M=0); FMA = zero-shot features "
        "transported M steps (M on val); FMA adaptive = per-row stopping rule chosen on val; "
        "linear probe = L2-regularised logistic regression; CLIP-Adapter = one-step residual "
        "adapter; CLIP-Adapter + FMA = FMA trained and run on the adapter's features (the "
        "paper's plug-in use); Tip-Adapter(-F) = cache model (-F: keys fine-tuned; without "
        "augmented views of fixed features it barely moves from Tip-Adapter). M on val "
        "(`fma_fast.select_steps`): the best accuracy, ties broken by the lower val "
        "cross-entropy (softmax of 100·cos), then by fewer steps. FMA moves "
        "features, not logits, so it cannot be stacked after the linear probe or Tip-Adapter; "
        'the "on FMA" rows instead fit those methods on FMA-transported features.',
        "",
    ]
    for dataset, by_shots in agg.items():
        lines += [f"## {dataset}", "", "Test accuracy (%), mean ± std over seeds:", ""]
        lines.append("| method | " + " | ".join(f"K={k}" for k in shots) + " |")
        lines.append("|---|" + "---:|" * len(shots))
        for method in METHODS:
            cells = []
            best = {k: max(by_shots[str(k)]["methods"][m][0] for m in METHODS) for k in shots}
            for k in shots:
                mean, std = by_shots[str(k)]["methods"][method]
                cell = _pct(mean, std)
                cells.append(f"**{cell}**" if mean == best[k] else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Paired differences (points, same seeds), mean ± std:", ""]
        lines.append("| comparison | " + " | ".join(f"K={k}" for k in shots) + " |")
        lines.append("|---|" + "---:|" * len(shots))
        for a, b in PAIRS:
            key = f"{a} - {b}"
            cells = [_signed(*by_shots[str(k)]["paired"][key]) for k in shots]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines += ["", "Findings (computed):", ""]
        for a, b in (
            ("FMA", "linear probe"),
            ("FMA", "CLIP-Adapter"),
            ("CLIP-Adapter + FMA", "CLIP-Adapter"),
            ("FMA adaptive", "FMA"),
        ):
            parts = []
            for k in shots:
                mean, std = by_shots[str(k)]["paired"][f"{a} - {b}"]
                parts.append(f"K={k} {_signed(mean, std)} ({_verdict(mean, std)})")
            lines.append(f"- {a} vs {b}: " + "; ".join(parts) + ".")
        steps_header = " | ".join(f"M={m}" for m in range(settings["max_steps"] + 1))
        steps_rule = "---:|" * (settings["max_steps"] + 1)
        lines += ["", "FMA test accuracy per M (mean over seeds), M chosen on val, adaptive:", ""]
        lines.append(
            f"| K | epochs (updates) | {steps_header} | M on val (per seed) "
            "| adaptive rule (per seed); mean stop step | shape |"
        )
        lines.append(f"|---:|---:|{steps_rule}---|---|---|")
        for k in shots:
            entry = by_shots[str(k)]
            curve = entry["test_by_steps"]
            lines.append(
                f"| {k} | {entry['fma_epochs']} ({entry['fma_updates']}) | "
                + " | ".join(_pct(m) for m, _ in curve)
                + f" | {', '.join(map(str, entry['chosen_steps']))}"
                + f" | {', '.join(entry['adaptive_rules'])}; "
                + f"{entry['adaptive_mean_steps'][0]:.1f} | {_curve_shape(curve)} |"
            )
        lines += ["", "CLIP-Adapter + FMA test accuracy per M (M=0 is CLIP-Adapter):", ""]
        lines.append(f"| K | {steps_header} | shape |")
        lines.append(f"|---:|{steps_rule}---|")
        for k in shots:
            curve = by_shots[str(k)]["adapter_test_by_steps"]
            lines.append(
                f"| {k} | " + " | ".join(_pct(m) for m, _ in curve) + f" | {_curve_shape(curve)} |"
            )
        lines.append("")
        oracle = [max(m for m, _ in by_shots[str(k)]["test_by_steps"]) for k in shots]
        chosen = [by_shots[str(k)]["methods"]["FMA"][0] for k in shots]
        lines.append(
            "Choosing M on val instead of on test (the released code's leak) costs "
            + ", ".join(f"K={k} {100 * (o - c):.1f}" for k, o, c in zip(shots, oracle, chosen))
            + " points against the best M on the mean test curve."
        )
        lines.append("")
    if result.get("convergence"):
        lines += [
            "## Training budget check",
            "",
            "FMA refit with twice the epochs at the smallest and largest K, first seed. The "
            "noise-free "
            "straight-line loss (fixed t grid) is the deterministic measure of fit; the training "
            "loss itself is a noisy one-sample estimate.",
            "",
            "| data | K | epochs (updates) | train line loss | val line loss "
            "| test acc at M on val | test acc at M=max |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for check_result in result["convergence"]:
            for fit_result in check_result["fits"]:
                lines.append(
                    f"| {check_result['dataset']} | {check_result['shots']} "
                    f"| {fit_result['epochs']} ({fit_result['updates']}) | "
                    f"{fit_result['train_line_loss']:.4f} | {fit_result['val_line_loss']:.4f} | "
                    f"{_pct(fit_result['test_accuracy_chosen_m'])} (M={fit_result['steps']}) | "
                    f"{_pct(fit_result['test_accuracy_max_m'])} |"
                )
        lines += ["", "Doubling the epochs changed (computed):", ""]
        for check_result in result["convergence"]:
            single, double = check_result["fits"]
            loss_change = double["val_line_loss"] / single["val_line_loss"] - 1
            at_max, at_chosen = (
                100 * (double[key] - single[key])
                for key in ("test_accuracy_max_m", "test_accuracy_chosen_m")
            )
            lines.append(
                f"- {check_result['dataset']} K={check_result['shots']}: val line loss "
                f"{100 * loss_change:+.1f}%, test accuracy at M=max {at_max:+.1f}, "
                f"at the M chosen on val {at_chosen:+.1f} points."
            )
        lines.append("")
    lines += ["## Time", "", "Mean seconds per fit (fit + scoring the test split):", ""]
    lines.append("| method | " + " | ".join(f"K={k}" for k in shots) + " |")
    lines.append("|---|" + "---:|" * len(shots))
    for method in (
        "linear probe",
        "CLIP-Adapter",
        "Tip-Adapter",
        "Tip-Adapter-F",
        "FMA",
        "CLIP-Adapter + FMA",
    ):
        cells = []
        for k in shots:
            times = [r["seconds"][method] for r in result["runs"] if r["shots"] == k]
            cells.append(f"{statistics.fmean(times):.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    if result["plots"]:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]]
    else:
        lines.append(f"_{result['plot_note']}_")
    lines.append("")
    return "\n".join(lines)


def _plots(result: dict, out: Path, name: str) -> tuple[list[str], str]:
    """Two small PNGs: accuracy vs K per method, and FMA's accuracy vs M per K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'fma_fast[plot]')"
    agg, shots = result["aggregate"], result["settings"]["shots"]
    datasets = list(agg)
    paths = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in PLOTTED:
            means = [100 * agg[dataset][str(k)]["methods"][method][0] for k in shots]
            stds = [100 * agg[dataset][str(k)]["methods"][method][1] for k in shots]
            ax.errorbar(shots, means, yerr=stds, marker="o", ms=3, capsize=2, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("shots K", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("test accuracy (%)", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    paths.append(_save_png(fig, out / f"{name}_accuracy.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.2), squeeze=False)
    steps = list(range(result["settings"]["max_steps"] + 1))
    for ax, dataset in zip(axes[0], datasets):
        for k in shots:
            curve = [100 * m for m, _ in agg[dataset][str(k)]["test_by_steps"]]
            (line,) = ax.plot(steps, curve, marker=".", ms=3, label=f"K={k}")
            chosen = agg[dataset][str(k)]["chosen_steps"]
            picked = round(statistics.fmean(chosen))
            ax.plot([picked], [curve[picked]], "x", color=line.get_color(), ms=6)
        ax.set_title(f"{dataset}: FMA per M (x: mean M on val)", fontsize=8)
        ax.set_xlabel("Euler steps M", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("test accuracy (%)", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    paths.append(_save_png(fig, out / f"{name}_steps.png"))
    plt.close(fig)
    return paths, ""


def _save_png(fig, path: Path) -> str:
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=80))
    return str(path)


def run_report(
    settings: ReportSettings, out: str | os.PathLike, *, name: str = "report", progress: bool = True
) -> dict:
    """Run the whole grid and write ``out/name.md``, ``out/name.json`` and the PNGs.

    Returns the result dict that the JSON holds.
    """
    _check_name(name)
    out = Path(out)
    start = time.perf_counter()
    if settings.features is not None:
        pool_sets = [file_pools(*settings.features)]
    else:
        pool_sets = [synthetic_pools(settings, d) for d in settings.difficulties]
    runs, convergence = [], []
    for pools in pool_sets:
        for shots in settings.shots:
            for seed in settings.seeds:
                run = run_one(pools, shots, seed, settings)
                runs.append(run)
                if progress:
                    accs = " ".join(f"{m}={100 * a:.1f}" for m, a in run["accuracy"].items())
                    print(
                        f"[{time.perf_counter() - start:6.0f}s] {pools.name} K={shots} "
                        f"seed={seed}: {accs}",
                        flush=True,
                    )
        if settings.convergence_check:
            for shots in sorted({min(settings.shots), max(settings.shots)}):
                base = next(
                    r
                    for r in runs
                    if r["dataset"] == pools.name
                    and r["shots"] == shots
                    and r["seed"] == settings.seeds[0]
                )
                convergence.append(convergence_check(pools, settings, base))
    settings_dict = asdict(settings)
    aggregated = aggregate(runs)
    result = {
        "name": name,
        "command": settings.command(str(out), name),
        "environment": environment(),
        "settings": settings_dict,
        "runs": runs,
        "convergence": convergence,
        # JSON keys are strings: K is stored as a string key throughout.
        "aggregate": json.loads(json.dumps(aggregated)),
    }
    result["seconds"] = time.perf_counter() - start
    write_report(result, out, name, progress=progress)
    return result


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    return name


def write_report(result: dict, out: str | os.PathLike, name: str, *, progress: bool = True) -> None:
    """Write ``name.json``, the PNGs and ``name.md`` for a result, each atomically."""
    out, name = Path(out), _check_name(name)
    result["plots"], result["plot_note"] = _plots(result, out, name)
    if progress and result["plot_note"]:
        print(result["plot_note"])
    markdown = render_markdown(result)
    atomic_write(out / f"{name}.json", lambda temp: temp.write_text(json.dumps(result, indent=1)))
    atomic_write(out / f"{name}.md", lambda temp: temp.write_text(markdown))
    if progress:
        print(
            f"wrote {out / (name + '.md')} and {out / (name + '.json')}"
            + "".join(f", {p}" for p in result["plots"])
        )


def rerender(out: str | os.PathLike, name: str = "report", *, progress: bool = True) -> dict:
    """Rewrite the markdown and PNGs from an existing ``out/name.json`` without rerunning:
    the numbers (and the recorded command, machine and date) stay those of the run."""
    path = Path(out) / f"{_check_name(name)}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report results at {path}: run the report first")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    write_report(result, out, name, progress=progress)
    return result


def cmd_report(args: argparse.Namespace) -> None:
    check_output_folder(args.out, "--out")
    if args.render_only:
        rerender(args.out, args.name, progress=not args.quiet)
        return
    files = (args.train, args.val, args.test)
    if any(files) and not all(files):
        raise ValueError("feature files need all three of --train, --val and --test")
    settings = ReportSettings(
        shots=tuple(args.shots),
        seeds=tuple(args.seeds),
        difficulties=tuple(args.difficulties),
        classes=args.classes,
        dim=args.dim,
        test_per_class=args.test_per_class,
        data_seed=args.data_seed,
        blocks=args.blocks,
        epochs=args.epochs,
        min_updates=args.min_updates,
        batch_size=args.batch_size,
        lr=args.lr,
        gamma=args.gamma,
        max_steps=args.max_steps,
        step_size=args.step_size,
        convergence_check=not args.skip_convergence_check,
        features=files if all(files) else None,
    )
    run_report(settings, args.out, name=args.name, progress=not args.quiet)


def add_command(commands) -> None:
    """Register ``fma-fast report`` on the CLI's subparsers."""
    defaults = ReportSettings()
    parser = commands.add_parser(
        "report", help="accuracy report: FMA vs baselines over shots, seeds and data sets"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default="report", help="file stem (default %(default)s)")
    data = parser.add_argument_group("data (synthetic unless --train/--val/--test are given)")
    data.add_argument("--train", help="train pool feature file (with labels)")
    data.add_argument("--val", help="val pool feature file (with labels)")
    data.add_argument("--test", help="test feature file (with labels)")
    data.add_argument(
        "--difficulties",
        type=float,
        nargs="+",
        default=list(defaults.difficulties),
        help="synthetic difficulties in [0, 1] (default %(default)s)",
    )
    for option, text in (
        ("classes", "synthetic classes"),
        ("dim", "synthetic feature dim"),
        ("test_per_class", "synthetic test rows per class"),
        ("data_seed", "seed of the synthetic data sets"),
    ):
        data.add_argument(
            f"--{option.replace('_', '-')}",
            type=int,
            default=getattr(defaults, option),
            help=f"{text} (default %(default)s)",
        )
    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=list(defaults.shots),
        help="K shots per class (default %(default)s)",
    )
    grid.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(defaults.seeds),
        help="seeds: shot draws and initialisations (default %(default)s)",
    )
    fma = parser.add_argument_group("FMA training")
    for option in ("blocks", "epochs", "min_updates", "batch_size"):
        fma.add_argument(
            f"--{option.replace('_', '-')}",
            type=int,
            default=getattr(defaults, option),
            help="default %(default)s",
        )
    for option in ("lr", "gamma", "step_size"):
        fma.add_argument(
            f"--{option.replace('_', '-')}",
            type=float,
            default=getattr(defaults, option),
            help="default %(default)s",
        )
    fma.add_argument(
        "--max-steps",
        type=int,
        default=defaults.max_steps,
        help="largest M; M * step size <= 1 (default %(default)s)",
    )
    parser.add_argument(
        "--skip-convergence-check",
        action="store_true",
        help="do not refit FMA with 2x epochs to check the budget",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the markdown and plots from an existing OUT/NAME.json, running nothing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=cmd_report)
