"""The summary of ``fma-fast run`` over seeds: mean ± std tables (the sample std, like the
report's) and the accuracy-per-M plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import atomic_write
from .aggregate import mean_std


def percent(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds, in percent."""
    mean, std = mean_std(values)
    return 100 * mean, 100 * std


def by_steps(runs: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """Per M, the mean and std (percent) of the runs' ``key`` curve."""
    return [percent(list(column)) for column in zip(*(run[key] for run in runs))]


def seed_table(runs: list[dict[str, Any]]) -> str:
    val, test = by_steps(runs, "val_accuracy"), by_steps(runs, "test_accuracy")
    chosen = [run["chosen_steps"] for run in runs]
    lines = ["  M      val acc         test acc     (mean ± sample std over seeds)"]
    for steps, ((vm, vs), (tm, ts)) in enumerate(zip(val, test)):
        mark = f"  <- chosen for {chosen.count(steps)} seed(s)" if steps in chosen else ""
        lines.append(f"{steps:>3}  {vm:6.2f} ± {vs:5.2f}  {tm:6.2f} ± {ts:5.2f}{mark}")
    return "\n".join(lines)


def plot_by_steps(path: Path, runs: list[dict[str, Any]]) -> str:
    """Mean ± std accuracy per M on val and test; a PNG when matplotlib is installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install fma_fast[plot])"
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    axes = figure.add_subplot()
    steps = list(range(len(runs[0]["test_accuracy"])))
    for key, label in (("val_accuracy", "val"), ("test_accuracy", "test")):
        stats = by_steps(runs, key)
        mean = [m for m, _ in stats]
        axes.plot(steps, mean, marker="o", label=label)
        axes.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    for number, chosen in enumerate(sorted({run["chosen_steps"] for run in runs})):
        label = "M chosen on val" if number == 0 else None
        axes.axvline(chosen, color="grey", linestyle=":", label=label)
    axes.set_xticks(steps)
    axes.set_xlabel("Euler steps M")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"FMA accuracy per M, mean ± std over {len(runs)} seed(s)")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png"))
    return f"plot: {path}"
