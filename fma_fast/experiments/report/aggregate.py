"""Mean and standard deviation over seeds: one convention (the sample std, n − 1) for every
table, the report's and ``fma-fast run``'s."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .settings import method_names, peft_pairs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value) over seeds."""
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
            for method in method_names(group):
                entry["methods"][method] = mean_std([r["accuracy"][method] for r in group])
            for key in ("test_by_steps", "val_by_steps", "adapter_test_by_steps"):
                columns = list(zip(*(r["fma"][key] for r in group)))
                entry[key] = [mean_std(col) for col in columns]
            entry["chosen_steps"] = [r["fma"]["fit"]["steps"] for r in group]
            entry["adaptive_rules"] = [r["chosen"]["FMA adaptive"]["rule"] for r in group]
            entry["adaptive_mean_steps"] = mean_std(
                [r["chosen"]["FMA adaptive"]["test_mean_steps"] for r in group]
            )
            entry["paired"] = {
                f"{a} - {b}": mean_std([r["accuracy"][a] - r["accuracy"][b] for r in group])
                for a, b in (*PAIRS, *peft_pairs(group))
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
