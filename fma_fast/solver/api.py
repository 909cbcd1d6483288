"""Solving and scoring test rows with the early-stopping Euler solver: the public functions.

Every function checks its arguments, resolves one :class:`~fma_fast.solver.routing.Route` and
streams the rows through it a batch at a time: the network runs in :mod:`fma_fast.solver.cpu`
(folded GEMM chain), :mod:`fma_fast.solver.fused` (fused kernels) or a plain loop, and the
states are scored through :mod:`fma_fast.ops.dispatch` or in torch class tiles
(:mod:`fma_fast.ops.scoring`). :func:`trajectory_scores` is the one pass over the states that
``select_steps``, ``accuracy_by_steps``, adaptive stopping and the report share.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..core import reference
from ..core import validation as check
from ..core.model import solve_settings
from ..core.names import (
    NETWORK_COMPILED,
    NETWORK_FALLBACK,
    NETWORK_FOLDED,
    NETWORK_FUSED,
    NETWORK_GENERIC,
    NETWORK_REFERENCE,
    PER_ROW_SCORING,
    SCORING_TILED,
    Backend,
    Precision,
)
from ..core.policy import LOGIT_SCALE, UNIT_ROW_TOLERANCE, best_on_val
from ..ops import class_tables, dispatch, scoring
from ..ops.class_tables import PerRowClasses
from . import cpu, fused, grad
from .plan import solver_plan
from .routing import Route, SolveOptions, resolve


@dataclass
class SolveResult:
    """Predictions of :func:`solve`: ``pred`` (N,), ``topk_values`` / ``topk_indices`` (N, k)
    (cosines, best first), ``path``, the implementation that ran, and with ``zero_shot=True``
    ``zero_shot_pred`` (N,), the top-1 class of the untransported rows (M=0)."""

    pred: torch.Tensor
    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    path: str
    zero_shot_pred: torch.Tensor | None = None


@dataclass
class StepSelection:
    """Accuracy and mean cross-entropy (softmax of 100·cos) after every M in 0..max_steps, and
    the best M by :func:`fma_fast.core.policy.best_on_val`: highest accuracy, then lowest
    cross-entropy, then fewest steps."""

    best_steps: int
    accuracy: list[float]
    cross_entropy: list[float]

    def table(self) -> str:
        lines = ["  M  accuracy  cross-entropy"]
        for steps, (acc, loss) in enumerate(zip(self.accuracy, self.cross_entropy)):
            mark = "  <- best" if steps == self.best_steps else ""
            lines.append(f"{steps:>3}  {100 * acc:7.2f}%  {loss:13.4f}{mark}")
        return "\n".join(lines)


class StateScores(NamedTuple):
    """Scores of one state of a row batch: the top-k cosines (N, k) and their classes, and,
    when asked, logsumexp_c(100·cos) (N,) and the cosine of each row's own label (N,)."""

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor | None
    true_cosine: torch.Tensor | None


# ------------------------------------------------------------------------- argument checks


def _check_steps(steps, step_size, name: str = "steps") -> int:
    steps = check.check_int(name, steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    if steps * step_size > 1.0 + 1e-9:
        check.warn_at_caller(
            f"{name} * step_size = {steps * step_size:g} > 1: the solve runs past t=1, "
            "beyond the time range the field was trained on"
        )
    return steps


def _settings(model, steps, step_size, name: str = "steps") -> tuple[int, float]:
    """M and h by the one precedence rule (:func:`fma_fast.core.model.solve_settings`); a
    ``max_steps`` nobody gave is the M that reaches t=1 (never the model's chosen M)."""
    chosen, step_size = solve_settings(model, None if name == "max_steps" else steps, step_size)
    step_size = check.check_positive_float("step_size", step_size)
    if name == "max_steps":
        chosen = int(1 / step_size + 1e-9) if steps is None else steps
    if chosen is None:
        raise ValueError("steps is required: pass steps (M), or load a model whose M was chosen "
                         "on val (fma_fast.load sets model.steps)")
    return _check_steps(chosen, step_size, name), step_size


def trajectory_settings(model, max_steps: int | None, step_size: float | None
                        ) -> tuple[int, float]:
    """The ``max_steps`` and h a trajectory pass (:func:`trajectory_scores`) runs with: the
    arguments given, then the model's h, and the M that reaches t=1 (checked)."""
    return _settings(model, max_steps, step_size, "max_steps")


def _inputs(features, model, class_features, *, labels=None, require_classes=False):
    """Checked features, class table (None when not given) and labels, all on one device."""
    if not callable(model):
        raise TypeError(f"model must be a velocity network u(x, t), got {type(model).__name__}")
    dim = getattr(model, "dim", None)
    x = check.check_matrix("features", features, dim=dim if isinstance(dim, int) else None)
    tensors = {"features": x}
    if class_features is None and require_classes:
        raise TypeError("class_features must be a (C, D) class table, got None")
    z = None
    if isinstance(class_features, PerRowClasses):
        if class_features.dim != x.shape[1]:
            raise ValueError(f"per-row class tables have dim {class_features.dim} but the "
                             f"features have {x.shape[1]}")
        class_features.check_rows(x.shape[0])
        z = class_features
    elif class_features is not None:
        z = check.check_matrix(
            "class_features", class_features, dim=x.shape[1], dim_source="features"
        )
        tensors["class_features"] = z
    y = None
    if labels is not None:
        tensors["labels"] = check.as_tensor("labels", labels)
    check.check_same_device(**tensors)
    if isinstance(z, torch.Tensor):
        check.check_finite("class_features", z)
    if z is not None and labels is not None:
        y = check.check_labels("labels", labels, rows=x.shape[0], num_classes=_classes(z))
    return x, z, y


def _classes(z) -> int:
    return z.num_classes if isinstance(z, PerRowClasses) else z.shape[0]


def _unit_rows(z, device: torch.device):
    """The class table in fp32 with unit rows on ``device``; CLIP tables usually are unit
    already (within :data:`~fma_fast.core.policy.UNIT_ROW_TOLERANCE`), and then no (C, D) copy
    is made (at C = 100,000 that copy would be 200 MB).
    Per-row tables are normalised a batch at a time, as they are read."""
    if isinstance(z, PerRowClasses):
        return z
    z = z.to(device, torch.float32)
    norms = torch.linalg.vector_norm(z, dim=-1)
    if bool(((norms - 1).abs() <= UNIT_ROW_TOLERANCE).all()):
        return z
    return F.normalize(z, dim=-1)


def _batches(x: torch.Tensor, route: Route, z=None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Rows moved to the compute device one batch at a time (fewer against per-row class
    tables ``z``, to bound their block), each checked for NaN/Inf; after the last, one warning
    if a row was not unit-norm."""
    norms = check.UnitNormWatch("features")
    size = route.batch_size
    if isinstance(z, PerRowClasses):
        size = min(size, z.batch_rows())
    for start in range(0, x.shape[0], size):
        rows = slice(start, min(start + size, x.shape[0]))
        # Only a copy to a GPU may be asynchronous: a non-blocking copy to the host may not
        # have landed when the finiteness check and a CPU solve read it.
        batch = x[rows].to(route.device, torch.float32,
                           non_blocking=route.device.type != "cpu")
        check.check_finite("features" if start == 0 else f"features[{start}:]", batch)
        norms.update(batch, start)
        yield rows, batch
    norms.warn()


# --------------------------------------------------------------------- the network paths


def _velocity(model, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
    """u(x, t) of a model that is not folded, checked: a wrong shape or NaN/Inf is an error."""
    velocity = model(x, t)
    if not isinstance(velocity, torch.Tensor) or velocity.shape != x.shape:
        got = tuple(velocity.shape) if isinstance(velocity, torch.Tensor) else type(velocity)
        raise ValueError(f"model(x, t) must return velocities of shape {tuple(x.shape)}, got {got}")
    if not bool(torch.isfinite(velocity.sum())):
        raise ValueError(
            f"model(x, t) returned NaN or Inf velocities at step {step + 1}: the field is not "
            "finite there; check its weights or its forward"
        )
    return velocity


def _check_state(state: torch.Tensor, step: int, start: int) -> torch.Tensor:
    """Refuse non-finite solver states: a NaN field would give every row the same class."""
    if not bool(torch.isfinite(state.sum())):
        raise ValueError(
            f"the solve produced NaN or Inf at step {step} (rows from {start} on): the "
            "model's velocities are not finite; check its weights or its forward"
        )
    return state


def _plan(route: Route, model, steps: int):
    return solver_plan(model, steps, route.step_size, dtype=route.dtype, device=route.device)


def _raw_states(route: Route, model, x: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
    """States x_0..x_M of one batch; a yielded tensor may be overwritten by the next step."""
    if route.network in (NETWORK_FOLDED, NETWORK_FALLBACK, NETWORK_COMPILED):
        yield from cpu.folded_states(
            model, x, steps, route.step_size, precision=route.precision,
            compiled=route.network == NETWORK_COMPILED,
        )
        return
    if route.network == NETWORK_FUSED:
        yield from fused.fused_states(_plan(route, model, steps), x)
        return
    x = x.clone()
    t = torch.zeros((), dtype=torch.float32, device=x.device)
    yield x
    low_precision = route.network == NETWORK_GENERIC and route.precision != "fp32"
    for step in range(steps):
        with torch.autocast(x.device.type, dtype=route.dtype, enabled=low_precision):
            velocity = _velocity(model, x, t, step)
        if route.network == NETWORK_REFERENCE:
            x, t = reference.euler_step(x, velocity, t, route.step_size)
        else:
            dispatch.euler_step(x, velocity, t, route.step_size, inplace=True,
                                backend=route.op_backend)
        yield x


def _states(route: Route, model, x: torch.Tensor, start: int, steps: int):
    """:func:`_raw_states`, each state refused when it holds NaN or Inf."""
    for step, state in enumerate(_raw_states(route, model, x, steps)):
        yield _check_state(state, step, start)


def _final_state(route: Route, model, x: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """x_M of one batch: the runtimes' final-only entry points where there is one."""
    if route.network in (NETWORK_FOLDED, NETWORK_FALLBACK, NETWORK_COMPILED):
        final = cpu.folded_final(
            model, x, steps, route.step_size, precision=route.precision,
            compiled=route.network == NETWORK_COMPILED,
        )
    elif route.network == NETWORK_FUSED:
        final = fused.fused_final(_plan(route, model, steps), x)
    else:
        final = deque(_raw_states(route, model, x, steps), maxlen=1)[0]
    return _check_state(final, steps, start)


# --------------------------------------------------------------------------- scoring


def _score(state: torch.Tensor, z: torch.Tensor, k: int, route: Route, *, with_lse: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """Top-k cosines (and the log-sum-exp) of one state: in torch class tiles on the CPU,
    through the dispatched ops (kernels on CUDA, the plain twins for ``backend="reference"``)
    elsewhere."""
    if route.tiled_scoring:
        values, indices, lse = scoring.tiled_scores(state, z, k, with_lse=with_lse)
        return values, indices, lse, SCORING_TILED
    top = dispatch.cosine_topk(state, z, k, normalized=True, backend=route.op_backend)
    lse = None
    if with_lse:
        lse = dispatch.cosine_logsumexp(state, z, LOGIT_SCALE, normalized=True,
                                        backend=route.op_backend).lse
    return top.values, top.indices, lse, top.path


def _scores(state, z, tables, k: int, route: Route, *, with_lse: bool, labels=None):
    """:func:`_score` against one class table, or against the batch's per-row ``tables``;
    also the own-label cosines when ``labels`` are given."""
    if tables is not None:
        values, indices, lse, true = class_tables.scores(state, tables, k, with_lse=with_lse,
                                                         labels=labels)
        return values, indices, lse, true, PER_ROW_SCORING
    values, indices, lse, path = _score(state, z, k, route, with_lse=with_lse)
    true = None if labels is None else scoring.true_cosines(state, z, labels)
    return values, indices, lse, true, path


def _check_ensemble_steps(ensemble_steps, steps: int) -> list[int]:
    if isinstance(ensemble_steps, (str, bytes)) or not isinstance(ensemble_steps, Iterable):
        raise TypeError(
            "ensemble_steps must be a sequence of step counts such as (0, 4, 8), "
            f"got {type(ensemble_steps).__name__}"
        )
    chosen = sorted({check.check_int("ensemble_steps", s) for s in ensemble_steps})
    if not chosen or chosen[-1] > steps:
        raise ValueError(
            f"ensemble_steps must be a non-empty set of steps in [0, {steps}], got {chosen}"
        )
    return chosen


def _solve_options(model, steps, step_size, precision, backend, batch_size, device, *,
                   name: str = "steps") -> tuple[int, SolveOptions]:
    """M (or ``max_steps``) by the one precedence rule, and the options every batch of the
    call runs with, checked once."""
    steps, step_size = _settings(model, steps, step_size, name)
    return steps, SolveOptions(step_size=step_size, precision=precision, backend=backend,
                               batch_size=batch_size, device=device)


@dataclass(frozen=True)
class _Scoring:
    """What ``solve`` scores a state for: the top-``topk`` classes, by cosine or by the step
    ensemble over ``ensemble_steps``, and the M=0 prediction when ``zero_shot``."""

    topk: int
    ensemble_steps: list[int] | None
    zero_shot: bool
    logit_scale: float

    @classmethod
    def checked(cls, z, steps: int, topk, ensemble_steps, zero_shot, logit_scale) -> _Scoring:
        if not isinstance(zero_shot, bool):
            raise TypeError(f"zero_shot must be True or False, got {type(zero_shot).__name__}")
        if z is None:
            for name, value in (("topk", topk), ("ensemble_steps", ensemble_steps),
                                ("zero_shot", zero_shot or None)):
                if value is not None:
                    raise ValueError(f"{name} needs class_features (a (C, D) class table) to "
                                     "score")
        if ensemble_steps is not None:
            ensemble_steps = _check_ensemble_steps(ensemble_steps, steps)
        topk = 1 if topk is None else check.check_int("topk", topk, minimum=1)
        if z is not None and topk > _classes(z):
            raise ValueError(f"topk must be <= the number of classes {_classes(z)}, got {topk}")
        if isinstance(z, PerRowClasses) and ensemble_steps is not None:
            raise ValueError("ensemble_steps is not available with per-row class tables")
        return cls(topk, ensemble_steps, zero_shot, logit_scale)


def _transported(route: Route, model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """x_M of every row, on the features' device."""
    transported = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for rows, batch in _batches(x, route):
        transported[rows] = _final_state(route, model, batch, rows.start, steps).to(x.device)
    return transported


def _batch_topk(route: Route, model, batch: torch.Tensor, start: int, steps: int, z, tables,
                scoring: _Scoring) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The top-k of one row batch at M: of x_M's cosines, or of the step ensemble."""
    if scoring.ensemble_steps is None:
        final = _final_state(route, model, batch, start, steps)
        values, indices, _, _, path = _scores(final, z, tables, scoring.topk, route,
                                              with_lse=False)
        return values, indices, path
    states = _states(route, model, batch, start, steps)
    kept = [state.clone() for s, state in enumerate(states) if s in scoring.ensemble_steps]
    return dispatch.step_ensemble_topk(kept, z, scoring.topk, logit_scale=scoring.logit_scale,
                                       normalized=True, backend=route.op_backend)


def _scored(route: Route, model, x: torch.Tensor, z, steps: int,
            scoring: _Scoring) -> SolveResult:
    """Every row batch solved and scored; results on the features' device."""
    values = torch.empty(x.shape[0], scoring.topk, dtype=torch.float32, device=x.device)
    indices = torch.empty(x.shape[0], scoring.topk, dtype=torch.long, device=x.device)
    zero_shot_pred = (torch.empty(x.shape[0], dtype=torch.long, device=x.device)
                      if scoring.zero_shot else None)
    scoring_path = None
    for rows, batch in _batches(x, route, z):
        tables = None  # the last batch's block goes before the next one is built
        tables = z.for_rows(batch, rows) if isinstance(z, PerRowClasses) else None
        if zero_shot_pred is not None:
            first = _scores(batch, z, tables, 1, route, with_lse=False)[1]
            zero_shot_pred[rows] = first[:, 0].to(x.device)
        top_values, top_indices, scoring_path = _batch_topk(route, model, batch, rows.start,
                                                            steps, z, tables, scoring)
        values[rows], indices[rows] = top_values.to(x.device), top_indices.to(x.device)
    return SolveResult(pred=indices[:, 0].clone(), topk_values=values, topk_indices=indices,
                       path=route.path(scoring_path), zero_shot_pred=zero_shot_pred)


# ----------------------------------------------------------------------- public functions


@torch.inference_mode()
def prepare_route(route: Route, model, steps: int) -> None:
    """Build now what the first batch of a :func:`solve` on ``route`` would build and could
    refuse: the compiled steps, compiled and checked in solve's grad mode. ``score`` calls it
    before it claims its output folder, so a backend that cannot run leaves nothing behind."""
    if route.network == NETWORK_COMPILED:
        cpu.compile_steps(model, steps, route.step_size, route.device)


def solve(
    features,
    model,
    steps: int | None = None,
    *,
    step_size: float | None = None,
    class_features=None,
    topk: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
    ensemble_steps: Sequence[int] | None = None,
    logit_scale: float = LOGIT_SCALE,
    zero_shot: bool = False,
    differentiable: bool = False,
) -> torch.Tensor | SolveResult:
    """Transport ``features`` (N, D) with M=``steps`` Euler steps of size ``step_size`` (None:
    the model's, as :func:`fma_fast.load` sets them, else h=0.1; see
    :func:`~fma_fast.core.model.solve_settings`).

    Without ``class_features`` returns the transported features (N, D). With a class table (C, D)
    returns a :class:`SolveResult` with the top-``topk`` (default 1) cosine classes per row; no
    N×C matrix is ever built. ``class_features`` may also be :class:`~fma_fast.PerRowClasses`
    (a table per row, CoCoOp), read or built one row batch at a time. Rows stream through
    ``device`` (default: the model's) ``batch_size`` at a time, so ``features`` may be a CPU
    tensor or numpy memmap larger than device memory; results come back on the features'
    device.

    ``precision``: "fp32" (exact to fp32 rounding), "bf16" or "fp16" (CUDA) GEMM operands with
    fp32 accumulation and an fp32 residual stream. ``backend``: "auto" picks the fastest exact
    path; "reference" forces the plain PyTorch loop, "folded" the torch GEMM chain, "triton"
    the fused kernels, "compiled" (bf16 on the CPU) the folded steps as ``torch.compile``d
    modules, which take minutes to compile per model and M and pay only on millions of rows
    (``fma_fast.solver.compiled``). ``ensemble_steps`` scores by the released code's step
    ensemble (sum of softmax(``logit_scale``·cos) at those steps, each ≤ ``steps``); values
    are then summed probabilities instead of cosines. ``zero_shot=True`` also scores the rows
    before the first step (M=0, the backbone's own prediction) in the same pass:
    ``.zero_shot_pred``. A NaN/Inf state (a non-finite field) raises ValueError.

    ``differentiable=True`` (no class table: top-k is not differentiable, score with
    :func:`fma_fast.cosine_cross_entropy`) returns x_M attached to autograd, computed on the
    model's device in one batch: gradients reach ``features`` and every parameter of a
    VelocityNet through its folded weights, recomputed from the parameters at every call
    (memory O(N·D·M): :mod:`fma_fast.solver.grad`); any other model is differentiated
    through the plain Euler loop. With ``precision="bf16"`` the forward runs bf16 GEMMs and
    the backward recomputes each step in fp32 from the states it saved. M=0 returns a copy
    of the features.

    Args:
        features: (N, D) rows: a tensor or a numpy array/memmap.
        model: a :class:`VelocityNet` or any callable ``u(x, t)``.
        steps, step_size: M and h (None: what the model carries).
        class_features: (C, D) table or :class:`~fma_fast.PerRowClasses`; None returns features.
        topk, batch_size, device, precision, backend, ensemble_steps, logit_scale, zero_shot:
            as above.

    Returns:
        The transported (N, D) features without ``class_features``; else a
        :class:`SolveResult` (``.pred``, ``.topk_values``, ``.topk_indices``, ``.path``).
    """
    if not isinstance(differentiable, bool):
        raise TypeError(
            f"differentiable must be True or False, got {type(differentiable).__name__}")
    if differentiable:
        return _differentiable(features, model, steps, step_size, precision, backend, device,
                               class_features=class_features, topk=topk,
                               batch_size=batch_size, ensemble_steps=ensemble_steps,
                               zero_shot=zero_shot or None)
    return _solve(features, model, steps, step_size, class_features, topk, batch_size, device,
                  precision, backend, ensemble_steps, logit_scale, zero_shot)


def _differentiable(features, model, steps, step_size, precision, backend, device,
                    **refused) -> torch.Tensor:
    """:func:`solve` with ``differentiable=True``: x_M attached to autograd; the arguments
    that score (``refused``) must be None."""
    for name, value in refused.items():
        if value is not None:
            raise ValueError(f"{name} is not available with differentiable=True, which returns "
                             "x_M (top-k is not differentiable: score x_M with "
                             "fma_fast.cosine_cross_entropy)")
    steps, step_size = _settings(model, steps, step_size)
    options = SolveOptions(step_size=step_size, precision=precision, backend=backend,
                           device=device)
    x, _, _ = _inputs(features, model, None)
    check.check_finite("features", x.detach())
    check.warn_unless_unit_rows("features", x.detach().float())
    route = resolve(model, options, steps, x.device, probe=False)
    return grad.differentiable_solve(model, x, steps, route)


@torch.inference_mode()
def _solve(features, model, steps, step_size, class_features, topk, batch_size, device,
           precision, backend, ensemble_steps, logit_scale, zero_shot
           ) -> torch.Tensor | SolveResult:
    """:func:`solve` without ``differentiable``, under inference mode."""
    steps, step_size = _settings(model, steps, step_size)
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    options = SolveOptions(step_size=step_size, precision=precision, backend=backend,
                           batch_size=batch_size, device=device)
    x, z, _ = _inputs(features, model, class_features)
    scoring = _Scoring.checked(z, steps, topk, ensemble_steps, zero_shot, logit_scale)
    route = resolve(model, options, steps, x.device)
    if z is None:
        return _transported(route, model, x, steps)
    return _scored(route, model, x, _unit_rows(z, route.device), steps, scoring)


def trajectory_scores(
    model,
    features,
    class_features,
    *,
    max_steps: int | None = None,
    labels=None,
    k: int = 1,
    with_lse: bool = False,
    step_size: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
) -> Iterator[tuple[slice, int, StateScores]]:
    """One pass over the states x_0..x_M of every row batch, scored as they come:
    ``(rows, m, StateScores)`` per batch and step, with the top-``k`` classes and, with
    ``with_lse``, the log-sum-exp at logit scale 100 (and each row's own-label cosine when
    ``labels`` are given). Memory stays one batch's state and class tile whatever N, C or M.
    ``step_size`` None: the model's (:func:`~fma_fast.core.model.solve_settings`); ``max_steps``
    None: the M that reaches t=1. Arguments are checked when called, before the first state."""
    max_steps, options = _solve_options(model, max_steps, step_size, precision, backend,
                                        batch_size, device, name="max_steps")
    return _trajectory_scores(model, features, class_features, max_steps, options,
                              labels=labels, k=k, with_lse=with_lse)


def _trajectory_scores(model, features, class_features, max_steps: int, options: SolveOptions,
                       *, labels=None, k: int = 1, with_lse: bool = False):
    """:func:`trajectory_scores` with M and the options resolved."""
    x, z, y = _inputs(features, model, class_features, labels=labels, require_classes=True)
    k = check.check_int("k", k, minimum=1)
    if k > _classes(z):
        raise ValueError(f"k must be <= the number of classes {_classes(z)}, got {k}")
    route = resolve(model, options, max_steps, x.device)
    z = _unit_rows(z, route.device)
    return _trajectory(model, x, z, y, max_steps, k, with_lse, route)


@torch.inference_mode()
def _trajectory(model, x, z, y, max_steps, k, with_lse, route):
    per_row = isinstance(z, PerRowClasses)
    for rows, batch in _batches(x, route, z):
        truth = None if y is None else y[rows].to(route.device)
        tables = None  # the last batch's block goes before the next one is built
        tables = z.for_rows(batch, rows) if per_row else None
        for step, state in enumerate(_states(route, model, batch, rows.start, max_steps)):
            values, indices, lse, true_cosine, _ = _scores(state, z, tables, k, route,
                                                           with_lse=with_lse, labels=truth)
            yield rows, step, StateScores(values, indices, lse, true_cosine)


def _accuracy_and_loss(model, features, labels, class_features, max_steps: int,
                       options: SolveOptions, *, with_loss: bool):
    scores = _trajectory_scores(model, features, class_features, max_steps, options,
                                labels=labels, with_lse=with_loss)
    rows = check.as_tensor("labels", labels).shape[0]
    correct: dict[int, int] = {}
    loss: dict[int, float] = {}
    y = check.as_tensor("labels", labels)
    for batch, step, scored in scores:
        truth = y[batch].to(scored.indices.device)
        correct[step] = correct.get(step, 0) + int((scored.indices[:, 0] == truth).sum())
        if with_loss:
            row_loss = scored.lse - LOGIT_SCALE * scored.true_cosine
            loss[step] = loss.get(step, 0.0) + float(row_loss.double().sum())
    steps = sorted(correct)
    accuracy = [correct[m] / rows for m in steps]
    return accuracy, [loss[m] / rows for m in steps] if with_loss else None


def accuracy_by_steps(
    model,
    features,
    labels,
    class_features,
    *,
    max_steps: int | None = None,
    step_size: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
) -> list[float]:
    """Top-1 accuracy after every M in 0..max_steps, from one trajectory pass over the rows.

    Args:
        model, features, labels, class_features: as for :func:`select_steps`.
        max_steps, step_size, batch_size, device, precision, backend: likewise.

    Returns:
        The accuracy (a fraction) for M = 0, 1, ..., max_steps.
    """
    max_steps, options = _solve_options(model, max_steps, step_size, precision, backend,
                                        batch_size, device, name="max_steps")
    return _accuracy_and_loss(model, features, labels, class_features, max_steps, options,
                              with_loss=False)[0]


def select_steps(
    model,
    val_features,
    val_labels,
    class_features,
    max_steps: int | None = None,
    step_size: float | None = None,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    backend: Backend = "auto",
) -> StepSelection:
    """Choose M on a validation split (the released code chose it on the test split, which
    leaks): the best accuracy over M in 0..max_steps, ties broken by the lower cross-entropy
    of softmax(100·cos) and then by fewer steps (:func:`fma_fast.core.policy.best_on_val`).
    ``step_size`` None: the model's, else 0.1; ``max_steps`` None: the M that reaches t=1.

    Args:
        model: the trained field.
        val_features, val_labels: (N, D) validation rows and their (N,) labels.
        class_features: (C, D) table or :class:`~fma_fast.PerRowClasses`.
        max_steps, step_size: the largest M tried and h.
        batch_size, device, precision, backend: as for :func:`solve`.

    Returns:
        A :class:`StepSelection`: ``.accuracy`` and ``.cross_entropy`` per M, ``.best_steps``
        and ``.table()``.
    """
    max_steps, options = _solve_options(model, max_steps, step_size, precision, backend,
                                        batch_size, device, name="max_steps")
    accuracy, cross_entropy = _accuracy_and_loss(model, val_features, val_labels,
                                                 class_features, max_steps, options,
                                                 with_loss=True)
    best = best_on_val(accuracy, cross_entropy, steps=range(len(accuracy)))
    return StepSelection(best_steps=best, accuracy=accuracy, cross_entropy=cross_entropy)
