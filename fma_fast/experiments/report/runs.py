"""The summary of ``fma-fast run`` over seeds: mean ± std tables (the sample std, like the
report's) and the accuracy-per-M plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...io.files import atomic_write
from .aggregate import mean_std


def percent(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds, in percent."""
    mean, std = mean_std(values)
    return 100 * mean, 100 * std


def by_steps(runs: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """Per M, the mean and std (percent) of the runs' ``key`` curve."""
    return [percent(list(column)) for column in zip(*(run[key] for run in runs))]


TEST_CURVES = {"val": "val_accuracy", "test": "test_accuracy"}
BASE_TO_NEW_CURVES = {"val (base)": "val_accuracy", "test base": "base_test_accuracy",
                      "test new": "new_test_accuracy"}


def curves_of(runs: list[dict[str, Any]]) -> dict[str, str]:
    """The accuracy curves the runs carry: val and test, or val and base/new test."""
    return BASE_TO_NEW_CURVES if "base_test_accuracy" in runs[0] else TEST_CURVES


def seed_table(runs: list[dict[str, Any]]) -> str:
    """Per M, mean ± sample std over seeds of every curve, and where val chose M."""
    curves = curves_of(runs)
    stats = [by_steps(runs, key) for key in curves.values()]
    chosen = [run["chosen_steps"] for run in runs]
    header = "".join(f"  {label:>15}" for label in curves)
    lines = [f"  M{header}  (mean ± sample std over seeds)"]
    for steps, row in enumerate(zip(*stats)):
        mark = f"  <- chosen for {chosen.count(steps)} seed(s)" if steps in chosen else ""
        cells = "".join(f"  {m:6.2f} ± {s:6.2f}" for m, s in row)
        lines.append(f"{steps:>3}{cells}{mark}")
    return "\n".join(lines)


def plot_by_steps(path: Path, runs: list[dict[str, Any]]) -> str:
    """Mean ± std accuracy per M of every curve; a PNG when matplotlib is installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install fma_fast[plot])"
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    axes = figure.add_subplot()
    steps = list(range(len(runs[0]["val_accuracy"])))
    for label, key in curves_of(runs).items():
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
    shots = runs[0].get("shots")
    shots = f"{shots} shots, " if shots is not None else ""
    axes.set_title(f"FMA accuracy per M, {shots}mean ± std over {len(runs)} seed(s)")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png"))
    return f"plot: {path}"
