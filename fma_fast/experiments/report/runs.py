"""The summary of ``fma-fast run`` over seeds: mean ± std tables (the sample std, like the
report's) and the accuracy-per-M plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...io.files import atomic_write
from .aggregate import mean_std


def by_steps(runs: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """Per M, the mean and sample std (fractions, like every accuracy the files hold) of the
    runs' ``key`` curve."""
    return [mean_std(list(column)) for column in zip(*(run[key] for run in runs))]


def percent_text(mean: float, std: float | None, width: int = 6) -> str:
    """An accuracy as printed: percent, with ± the sample std over seeds when there are
    several (one seed has no spread to show)."""
    text = f"{100 * mean:{width}.2f}"
    return text if std is None else f"{text} ± {100 * std:{width - 1}.2f}"


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
    several = len(runs) > 1
    header = "".join(f"  {label:>{15 if several else 6}}" for label in curves)
    lines = [f"  M{header}  (%, " + ("mean ± sample std over seeds)" if several else "1 seed)")]
    for steps, row in enumerate(zip(*stats)):
        mark = f"  <- chosen for {chosen.count(steps)} seed(s)" if steps in chosen else ""
        cells = "".join(f"  {percent_text(m, s if several else None)}" for m, s in row)
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
        stats = [(100 * m, 100 * s) for m, s in by_steps(runs, key)]
        axes.plot(steps, [m for m, _ in stats], marker="o", label=label)
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
