"""The report's plots (matplotlib, the ``plot`` extra): accuracy vs K, and FMA's accuracy vs M;
and ``fma-fast run``'s accuracy-per-M plot. Written atomically, large enough to read."""

from __future__ import annotations

import statistics
from pathlib import Path

from ...io.files import atomic_write
from .settings import PLOTTED


def write_plots(result: dict, out: Path, name: str) -> tuple[list[str], str]:
    """Two PNGs (640 × 480 px per feature set): accuracy vs K per method, and FMA's accuracy
    vs M per K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'fma_fast[plot]')"
    agg, shots = result["aggregate"], result["settings"]["shots"]
    datasets = list(agg)
    paths = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in PLOTTED:
            means = [100 * agg[dataset][str(k)]["methods"][method][0] for k in shots]
            stds = [100 * agg[dataset][str(k)]["methods"][method][1] for k in shots]
            ax.errorbar(shots, means, yerr=stds, marker="o", ms=3, capsize=2, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_title(dataset, fontsize=11)
        ax.set_xlabel("shots K", fontsize=10)
        ax.tick_params(labelsize=9)
    axes[0][0].set_ylabel("test accuracy (%)", fontsize=10)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(_save_png(fig, out / f"{name}_accuracy.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 4.8), squeeze=False)
    steps = list(range(result["settings"]["max_steps"] + 1))
    for ax, dataset in zip(axes[0], datasets):
        for k in shots:
            curve = [100 * m for m, _ in agg[dataset][str(k)]["test_by_steps"]]
            (line,) = ax.plot(steps, curve, marker=".", ms=3, label=f"K={k}")
            chosen = agg[dataset][str(k)]["chosen_steps"]
            picked = round(statistics.fmean(chosen))
            ax.plot([picked], [curve[picked]], "x", color=line.get_color(), ms=6)
        ax.set_title(f"{dataset}: FMA per M (x: mean M on val)", fontsize=10)
        ax.set_xlabel("Euler steps M", fontsize=10)
        ax.tick_params(labelsize=9)
    axes[0][0].set_ylabel("test accuracy (%)", fontsize=10)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(_save_png(fig, out / f"{name}_steps.png"))
    plt.close(fig)
    return paths, ""


def _save_png(fig, path: Path) -> str:
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=100))
    return str(path)
