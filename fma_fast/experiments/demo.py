"""The demo: fit a field on a synthetic task's training split, choose M on val, and report the
test accuracy per M (what ``fma-fast demo`` runs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from ..core.policy import DEFAULT_STEP_SIZE
from ..solver.api import StepSelection, accuracy_by_steps, select_steps
from ..train.fit import FitResult, FitSettings, fit
from .synthetic import FewShotTask


def accuracy_table(val: list[float] | None, test: list[float], chosen: int) -> str:
    """Val and test accuracy per M, the chosen M marked."""
    header = "  M   val acc  test acc" if val is not None else "  M  test acc"
    lines = [header]
    for steps, test_acc in enumerate(test):
        val_part = f"  {100 * val[steps]:7.2f}%" if val is not None else ""
        mark = "  <- chosen on val" if steps == chosen else ""
        lines.append(f"{steps:>3}{val_part}  {100 * test_acc:7.2f}%{mark}")
    return "\n".join(lines)


def run_demo(task: FewShotTask, settings: FitSettings, *, max_steps: int = 10,
             step_size: float = DEFAULT_STEP_SIZE, device: str | torch.device | None = None,
             echo: Callable[[str], None] = print
             ) -> tuple[FitResult, StepSelection, list[float]]:
    """Fit, choose M on val, score test at every M; ``echo`` gets the fit line, the accuracy
    table and the test accuracy at M=0 and at the chosen M. Returns the fit, the selection
    and the test accuracy per M."""
    start = time.perf_counter()
    result = fit(task.train.features, task.train.labels, task.class_features, device=device,
                 **asdict(settings))
    echo(f"fit: {settings.epochs} epochs in {time.perf_counter() - start:.1f} s, "
         f"loss {result.history[0]:.4f} -> {result.history[-1]:.4f}")
    solve_options = {"max_steps": max_steps, "step_size": step_size, "device": device}
    selection = select_steps(result.model, task.val.features, task.val.labels,
                             task.class_features, **solve_options)
    test = accuracy_by_steps(result.model, task.test.features, task.test.labels,
                             task.class_features, **solve_options)
    echo(accuracy_table(selection.accuracy, test, selection.best_steps))
    chosen = selection.best_steps
    echo(f"test accuracy: M=0 (zero-shot) {100 * test[0]:.2f}%, "
         f"M={chosen} (chosen on val) {100 * test[chosen]:.2f}%")
    return result, selection, test
