"""Solver-aware refinement: continue training a fitted field by the loss of what it is used for,
the cosine cross-entropy of the early-stopped solve (docs/method.md §1, §3).

Flow matching trains u(x, t) on straight lines at every t; classification reads x_M at one
early-stopping M only, and late steps may carry features to wrong classes. :func:`refine`
trains the field through the solve (``solve(..., differentiable=True)``) so that x_M, or a
weighted mix of the states x_1..x_M, lands on its own class text.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..core import validation as check
from ..core.model import VelocityNet
from ..core.names import Backend, Precision, Schedule
from ..core.policy import LOGIT_SCALE
from ..ops import scoring
from ..ops.class_tables import PerRowClasses
from ..solver import grad
from ..solver.routing import SolveOptions, resolve
from .fit import FitResult
from .schedules import learning_rates

REFINE_LR = 2e-5
"""The default learning rate of refinement (a tenth of training's: it starts from a fitted
field; benchmarks/results/notes/refinement.md)."""

REFINE_SCHEDULE: Schedule = "warmup-cosine"
"""The learning rate of refinement: a cosine from ``lr`` to 0 over its steps (no warm-up: it
starts from a trained field)."""


def _check_step_weights(step_weights, steps: int) -> list[float] | None:
    if step_weights is None:
        return None
    if isinstance(step_weights, (str, bytes)) or not isinstance(step_weights, Sequence):
        raise TypeError("step_weights must be a sequence of one weight per state x_1..x_M, "
                        f"got {type(step_weights).__name__}")
    weights = [check.check_positive_float("step_weights", w, allow_zero=True)
               for w in step_weights]
    if len(weights) != steps or not sum(weights) > 0:
        raise ValueError(f"step_weights must hold {steps} weights >= 0 (x_1..x_M) with a "
                         f"positive sum, got {weights}")
    return weights


def refine(
    model: VelocityNet,
    features,
    labels,
    class_features,
    *,
    steps: int,
    epochs: int = 10,
    lr: float = REFINE_LR,
    batch_size: int = 32,
    weight_decay: float = 0.01,
    step_weights: Sequence[float] | None = None,
    step_size: float = 0.1,
    logit_scale: float = LOGIT_SCALE,
    seed: int = 1,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
    progress: bool = True,
) -> FitResult:
    """Continue training a copy of ``model`` by the cosine cross-entropy of its solve at M =
    ``steps`` (the M chosen on validation) against the whole class table; ``model`` itself is
    not changed.

    The loss is ``cosine_cross_entropy(x_M, class_features, labels)``, or with
    ``step_weights`` (one weight per state x_1..x_M) the weighted mean of the losses at every
    state up to M. AdamW (``lr``, ``weight_decay``), the rate decaying as a cosine to 0 over
    ``epochs`` passes of ``batch_size`` rows, reshuffled each epoch from ``seed``. The solve
    runs as ``solve(..., differentiable=True)`` does (``precision``, ``backend``). Returns a
    :class:`~fma_fast.FitResult`: the refined model, its settings (``config``), the mean
    loss per epoch (``history``) and the rate of every optimizer step. Choose M on the
    validation split again afterwards (``select_steps``).
    """
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a fitted VelocityNet, got {type(model).__name__}")
    if isinstance(class_features, PerRowClasses):
        raise TypeError("refine takes one (C, D) class table; per-row class tables (CoCoOp) "
                        "are not supported")
    x_all = check.check_matrix("features", features, dim=model.dim)
    z_all = check.check_matrix("class_features", class_features, dim=x_all.shape[1],
                               dim_source="features")
    y_all = check.check_labels("labels", labels, rows=x_all.shape[0], num_classes=z_all.shape[0])
    check.check_same_device(features=x_all, labels=y_all, class_features=z_all)
    check.check_finite("features", x_all)
    check.check_finite("class_features", z_all)
    check.warn_unless_unit_rows("features", x_all)
    check.warn_unless_unit_rows("class_features", z_all)
    steps = check.check_int("steps", steps, minimum=1)
    epochs = check.check_int("epochs", epochs, minimum=1)
    batch_size = check.check_int("batch_size", batch_size, minimum=1)
    lr = check.check_positive_float("lr", lr)
    weight_decay = check.check_positive_float("weight_decay", weight_decay, allow_zero=True)
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    seed = check.check_int("seed", seed)
    weights = _check_step_weights(step_weights, steps)
    options = SolveOptions(step_size=step_size, precision=precision, backend=backend,
                           device=device)
    route = resolve(model, options, steps, x_all.device, probe=False)

    model = copy.deepcopy(model).to(route.device).train()
    x_all = x_all.detach().to(route.device, torch.float32)
    y_all = y_all.to(route.device)
    unit_table = torch.nn.functional.normalize(z_all.detach().to(route.device, torch.float32),
                                               dim=-1)
    rows = x_all.shape[0]
    total = epochs * math.ceil(rows / batch_size)
    rates = learning_rates(REFINE_SCHEDULE, lr, 0, total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator(device=route.device).manual_seed(seed)
    mix = None
    if weights is not None:
        mix = torch.tensor(weights, device=route.device) / sum(weights)

    history: list[float] = []
    taken: list[float] = []
    bar = tqdm(range(epochs), desc="refine", unit="epoch", disable=None if progress else True,
               leave=False)
    for epoch in bar:
        order = torch.randperm(rows, device=route.device, generator=generator)
        loss_sum = 0.0
        for start in range(0, rows, batch_size):
            index = order[start:start + batch_size]
            x0, truth = x_all[index], y_all[index]
            if mix is None:
                moved = grad.differentiable_solve(model, x0, steps, route)
                loss = scoring.tiled_cross_entropy(moved, unit_table, truth, logit_scale)
            else:
                states = grad.differentiable_solve(model, x0, steps, route,
                                                         trajectory=True)
                loss = sum(w * scoring.tiled_cross_entropy(states[m + 1], unit_table, truth,
                                                           logit_scale)
                           for m, w in enumerate(mix) if w > 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = rates[len(taken)]
            taken.append(rates[len(taken)])
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
        epoch_loss = loss_sum / rows
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"refinement loss became {epoch_loss} in epoch {epoch + 1}; lower lr")
        history.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
    bar.close()
    config = {
        "objective": "cosine-cross-entropy",
        "steps": steps,
        "step_weights": weights,
        "step_size": step_size,
        "logit_scale": logit_scale,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "schedule": "cosine",
        "optimizer_steps": len(taken),
        "seed": seed,
        "precision": precision,
        "path": route.network,
        "rows": rows,
        "classes": int(z_all.shape[0]),
    }
    return FitResult(model=model.eval(), config=config, history=history, learning_rates=taken)
