"""Batch solving and scoring: stream test rows through the early-stopping Euler solver."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check
from . import dispatch, reference, scoring
from .fused_solver import fused_states, kernels_run
from .kernels._common import HAS_TRITON
from .model import VelocityNet
from .plan import folded_final, folded_states, solver_plan

DEFAULT_CHUNK_ROWS = {"cpu": 4096, "cuda": 65536}
PATH_TILED = "torch-tiled"


@dataclass
class SolveResult:
    """Predictions of :func:`solve`: ``pred`` (N,), ``topk_values`` / ``topk_indices`` (N, k)
    (cosines, best first), and ``path``, the implementation that ran."""

    pred: torch.Tensor
    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    path: str


@dataclass
class StepSelection:
    """Accuracy and mean cross-entropy (softmax of 100·cos) after every M in 0..max_steps, and
    the best M: highest accuracy, then lowest cross-entropy, then fewest steps. Small val
    splits tie often (4 shots per class); the cross-entropy keeps a saturated split from
    settling on the first perfect M."""

    best_steps: int
    accuracy: list[float]
    cross_entropy: list[float]

    def table(self) -> str:
        lines = ["  M  accuracy  cross-entropy"]
        for steps, (acc, loss) in enumerate(zip(self.accuracy, self.cross_entropy)):
            mark = "  <- best" if steps == self.best_steps else ""
            lines.append(f"{steps:>3}  {100 * acc:7.2f}%  {loss:13.4f}{mark}")
        return "\n".join(lines)


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


def _model_dim(model) -> int | None:
    return getattr(model, "dim", None) if isinstance(getattr(model, "dim", None), int) else None


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be a velocity network u(x, t), got {type(model).__name__}")


def _check_steps(steps, step_size, name: str = "steps") -> tuple[int, float]:
    steps = check.check_int(name, steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    if steps * step_size > 1.0 + 1e-9:
        check.warn_at_caller(
            f"{name} * step_size = {steps * step_size:g} > 1: the solve runs past t=1, "
            "beyond the time range the field was trained on"
        )
    return steps, step_size


def _check_state(state: torch.Tensor, step: int, start: int) -> torch.Tensor:
    """Refuse non-finite solver states: a NaN field would give every row the same class."""
    if not bool(torch.isfinite(state.sum())):
        raise ValueError(
            f"the solve produced NaN or Inf at step {step} (rows from {start} on): the "
            "model's velocities are not finite; check its weights or its forward"
        )
    return state


def _chunks(
    features: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Rows moved to the compute device one chunk at a time, each checked for NaN/Inf."""
    for start in range(0, features.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, features.shape[0]))
        chunk = features[rows].to(device, torch.float32, non_blocking=True)
        check.check_finite("features" if start == 0 else f"features[{start}:]", chunk)
        yield rows, chunk


def _prepare(
    features, model, class_features, batch_size, device, labels=None, require_classes=False
):
    _check_model(model)
    dim = _model_dim(model)
    x = check.check_matrix("features", features, dim=dim)
    tensors = {"features": x}
    z = None
    if class_features is None and require_classes:
        raise TypeError("class_features must be a (C, D) class table, got None")
    if class_features is not None:
        z = check.check_matrix(
            "class_features", class_features, dim=x.shape[1], dim_source="features"
        )
        tensors["class_features"] = z
    if labels is not None:
        tensors["labels"] = labels
    check.check_same_device(**tensors)
    if z is not None:
        check.check_finite("class_features", z)
    device = check.resolve_device(device, default=_model_device(model) or x.device)
    if batch_size is None:
        batch_size = DEFAULT_CHUNK_ROWS.get(device.type, 4096)
    batch_size = check.check_int("batch_size", batch_size, minimum=1)
    if z is not None:
        z = z.to(device, torch.float32)
    return x, z, batch_size, device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("auto", "reference", "folded", "triton")
ROUTE_REFERENCE, ROUTE_GENERIC, ROUTE_FOLDED, ROUTE_FUSED, ROUTE_FALLBACK = (
    "reference",
    "generic",
    "folded",
    "fused-triton",
    "folded-fallback",
)
"""ROUTE_FALLBACK: the fused kernels cannot run on this GPU, so the torch GEMM chain runs."""


def _route(model, device: torch.device, precision: str, backend: str) -> str:
    """Which network path runs: the fastest exact one unless ``backend`` forces another.

    auto: a VelocityNet runs folded (FMA_FACTS §3) — through the fused Triton kernels on CUDA,
    as a torch GEMM chain elsewhere; any other velocity module runs as given ("generic").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if backend == "reference":
        if precision != "fp32":
            raise ValueError(f"the reference runs in fp32 only, got precision={precision!r}")
        return ROUTE_REFERENCE
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "precision='fp16' needs a CUDA device (CPUs have no fast fp16 GEMM); "
            "use 'bf16' or 'fp32'"
        )
    if not isinstance(model, VelocityNet):
        if backend in ("folded", "triton"):
            raise ValueError(f"backend={backend!r} needs a VelocityNet, got {type(model).__name__}")
        return ROUTE_GENERIC
    if backend == "folded":
        return ROUTE_FOLDED
    if backend == "triton":
        dispatch.select_path("triton", torch.empty(0, device=device))  # raises with the reason
        return ROUTE_FUSED
    return ROUTE_FUSED if device.type == "cuda" and HAS_TRITON else ROUTE_FOLDED


def _checked_route(route, model, steps, step_size, precision, backend, device) -> str:
    """The fused route where its kernels run here; else (backend "auto") the torch chain."""
    if route != ROUTE_FUSED or backend == "triton":
        return route
    plan = solver_plan(model, steps, step_size, dtype=PRECISIONS[precision], device=device)
    return ROUTE_FUSED if kernels_run(plan) else ROUTE_FALLBACK


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


def _states(
    route: str,
    model,
    x: torch.Tensor,
    steps: int,
    step_size: float,
    precision: str,
    op_backend: str,
) -> Iterator[torch.Tensor]:
    """States x_0..x_M of one chunk; a yielded tensor may be overwritten by the next step."""
    if route in (ROUTE_FOLDED, ROUTE_FALLBACK):
        yield from folded_states(model, x, steps, step_size, precision=precision)
        return
    if route == ROUTE_FUSED:
        plan = solver_plan(model, steps, step_size, dtype=PRECISIONS[precision], device=x.device)
        yield from fused_states(plan, x)
        return
    x = x.clone()
    t = torch.zeros((), dtype=torch.float32, device=x.device)
    yield x
    low_precision = route == ROUTE_GENERIC and precision != "fp32"
    for step in range(steps):
        with torch.autocast(x.device.type, dtype=PRECISIONS[precision], enabled=low_precision):
            velocity = _velocity(model, x, t, step)
        if route == ROUTE_REFERENCE:
            x, t = reference.euler_step(x, velocity, t, step_size)
        else:
            dispatch.euler_step(x, velocity, t, step_size, inplace=True, backend=op_backend)
        yield x


def _checked_states(route, model, chunk, start, steps, step_size, precision, op_backend):
    """:func:`_states`, each state refused when it holds NaN or Inf."""
    states = _states(route, model, chunk, steps, step_size, precision, op_backend)
    for step, state in enumerate(states):
        yield _check_state(state, step, start)


def _final_state(
    route: str,
    model,
    x: torch.Tensor,
    start: int,
    steps: int,
    step_size: float,
    precision: str,
    op_backend: str,
) -> torch.Tensor:
    """x_M of one chunk (rows from ``start`` on); the folded route merges each step's final
    layer with the next input projection when the states in between are not needed
    (``plan.folded_final``)."""
    if route in (ROUTE_FOLDED, ROUTE_FALLBACK):
        final = folded_final(model, x, steps, step_size, precision=precision)
    else:
        states = _states(route, model, x, steps, step_size, precision, op_backend)
        final = deque(states, maxlen=1)[0]
    return _check_state(final, steps, start)


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """The class table with unit rows; CLIP tables usually are already, and then no (C, D) copy
    is made (with C = 100,000 classes that copy alone would be 200 MB)."""
    norms = torch.linalg.vector_norm(z, dim=-1)
    if bool(((norms - 1).abs() <= 1e-6).all()):
        return z
    return F.normalize(z, dim=-1)


def _op_backend(backend: str, device: torch.device) -> str:
    """The dispatch backend of the fused update and scoring ops: Triton on CUDA; on the CPU the
    torch paths, unless ``backend="triton"`` asks for the (test-only, slow) interpreter."""
    if backend in ("reference", "triton"):
        return backend
    return "auto" if device.type == "cuda" else "reference"


def _topk(
    state: torch.Tensor, z: torch.Tensor, k: int, op_backend: str, tiled: bool
) -> dispatch.TopK:
    """Top-k cosines of unit-norm ``z``: Triton where it runs, else class tiles in torch so
    memory stays bounded for any C (``tiled=False`` keeps the plain reference twin)."""
    if op_backend != "reference" or not tiled:
        return dispatch.cosine_topk(state, z, k, normalized=True, backend=op_backend)
    return dispatch.TopK(*scoring.tiled_topk(state, z, k), PATH_TILED)


def _path_name(route: str, precision: str, scoring: str | None) -> str:
    if route == ROUTE_REFERENCE and scoring in (None, dispatch.PATH_REFERENCE):
        return ROUTE_REFERENCE
    network = route if route == ROUTE_REFERENCE else f"{route}-{precision}"
    return network if scoring is None else f"{network}+{scoring}-topk"


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


@torch.inference_mode()
def solve(
    features,
    model,
    steps: int,
    *,
    step_size: float = 0.1,
    class_features=None,
    topk: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    backend: str = "auto",
    ensemble_steps: Sequence[int] | None = None,
    logit_scale: float = 100.0,
) -> torch.Tensor | SolveResult:
    """Transport ``features`` (N, D) with M=``steps`` Euler steps of size ``step_size``.

    Without ``class_features`` returns the transported features (N, D). With a class table (C, D)
    returns a :class:`SolveResult` with the top-``topk`` (default 1) cosine classes per row; no
    N×C matrix is ever built. Rows stream through ``device`` (default: the model's)
    ``batch_size`` at a time, so ``features`` may be a CPU tensor or numpy memmap larger than
    device memory; results come back on the features' device.

    ``precision``: "fp32" (exact to fp32 rounding), "bf16" or "fp16" (CUDA) GEMM operands with
    fp32 accumulation and an fp32 residual stream. ``backend``: "auto" picks the fastest exact
    path; "reference" forces the plain PyTorch loop, "folded" the torch GEMM chain, "triton"
    the fused kernels. ``ensemble_steps`` scores by the released code's step ensemble (sum of
    softmax(``logit_scale``·cos) at those steps, each ≤ ``steps``); values are then summed
    probabilities instead of cosines. A NaN/Inf state (a non-finite field) raises ValueError.
    """
    steps, step_size = _check_steps(steps, step_size)
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    x, z, batch_size, device = _prepare(features, model, class_features, batch_size, device)
    route = _route(model, device, precision, backend)
    route = _checked_route(route, model, steps, step_size, precision, backend, device)
    op_backend = _op_backend(backend, device)
    if z is None:
        for name, value in (("topk", topk), ("ensemble_steps", ensemble_steps)):
            if value is not None:
                raise ValueError(f"{name} needs class_features (a (C, D) class table) to score")
        transported = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for rows, chunk in _chunks(x, batch_size, device):
            transported[rows] = _final_state(
                route, model, chunk, rows.start, steps, step_size, precision, op_backend
            ).to(x.device)
        return transported
    if ensemble_steps is not None:
        ensemble_steps = _check_ensemble_steps(ensemble_steps, steps)
    topk = 1 if topk is None else check.check_int("topk", topk, minimum=1)
    if topk > z.shape[0]:
        raise ValueError(f"topk must be <= the number of classes {z.shape[0]}, got {topk}")
    z = _unit_rows(z)
    values = torch.empty(x.shape[0], topk, dtype=torch.float32, device=x.device)
    indices = torch.empty(x.shape[0], topk, dtype=torch.long, device=x.device)
    scoring_path = None
    for rows, chunk in _chunks(x, batch_size, device):
        if ensemble_steps is None:
            final = _final_state(
                route, model, chunk, rows.start, steps, step_size, precision, op_backend
            )
            scored = _topk(final, z, topk, op_backend, tiled=backend != "reference")
        else:
            states = _checked_states(
                route, model, chunk, rows.start, steps, step_size, precision, op_backend
            )
            kept = [state.clone() for s, state in enumerate(states) if s in ensemble_steps]
            scored = dispatch.step_ensemble_topk(
                kept, z, topk, logit_scale=logit_scale, normalized=True, backend=op_backend
            )
        values[rows], indices[rows] = scored.values.to(x.device), scored.indices.to(x.device)
        scoring_path = scored.path
    return SolveResult(
        pred=indices[:, 0].clone(),
        topk_values=values,
        topk_indices=indices,
        path=_path_name(route, precision, scoring_path),
    )


def _step_scores(
    state: torch.Tensor, z: torch.Tensor, truth: torch.Tensor, op_backend: str, tiled: bool,
    with_loss: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-1 predictions and, with ``with_loss``, the summed cross-entropy of one state."""
    if op_backend == "reference" and tiled:
        (_, indices), loss = scoring.tiled_scores(state, z, 1, truth if with_loss else None)
        return indices[:, 0], None if loss is None else loss.double().sum()
    pred = _topk(state, z, 1, op_backend, tiled).indices[:, 0]
    if not with_loss:
        return pred, None
    mean = dispatch.cosine_cross_entropy(
        state, z, truth, scoring.LOSS_LOGIT_SCALE, normalized=True, backend=op_backend
    ).loss
    return pred, mean.double() * len(truth)


@torch.inference_mode()
def _scores_by_steps(
    model,
    features,
    labels,
    class_features,
    max_steps,
    step_size,
    batch_size,
    device,
    precision,
    backend,
    with_loss: bool,
) -> tuple[list[float], list[float] | None]:
    """Accuracy and, with ``with_loss``, mean cross-entropy (logit scale 100) after every M,
    from one pass over the rows (and, on the CPU, one pass over the classes per state)."""
    max_steps, step_size = _check_steps(max_steps, step_size, name="max_steps")
    x, z, batch_size, device = _prepare(
        features,
        model,
        class_features,
        batch_size,
        device,
        labels=check.as_tensor("labels", labels),
        require_classes=True,
    )
    y = check.check_labels("labels", labels, rows=x.shape[0], num_classes=z.shape[0])
    route = _route(model, device, precision, backend)
    route = _checked_route(route, model, max_steps, step_size, precision, backend, device)
    op_backend = _op_backend(backend, device)
    tiled = backend != "reference"
    z = _unit_rows(z)
    correct = torch.zeros(max_steps + 1, dtype=torch.long, device=device)
    loss_sum = torch.zeros(max_steps + 1, dtype=torch.float64, device=device)
    for rows, chunk in _chunks(x, batch_size, device):
        truth = y[rows].to(device)
        states = _checked_states(
            route, model, chunk, rows.start, max_steps, step_size, precision, op_backend
        )
        for steps, state in enumerate(states):
            pred, loss = _step_scores(state, z, truth, op_backend, tiled, with_loss)
            correct[steps] += (pred == truth).sum()
            if loss is not None:
                loss_sum[steps] += loss
    accuracy = (correct.double() / x.shape[0]).tolist()
    return accuracy, (loss_sum / x.shape[0]).tolist() if with_loss else None


def accuracy_by_steps(
    model,
    features,
    labels,
    class_features,
    *,
    max_steps: int = 10,
    step_size: float = 0.1,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    backend: str = "auto",
) -> list[float]:
    """Top-1 accuracy after every M in 0..max_steps, from one trajectory pass over the rows."""
    return _scores_by_steps(
        model,
        features,
        labels,
        class_features,
        max_steps,
        step_size,
        batch_size,
        device,
        precision,
        backend,
        with_loss=False,
    )[0]


def select_steps(
    model,
    val_features,
    val_labels,
    class_features,
    max_steps: int = 10,
    step_size: float = 0.1,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    backend: str = "auto",
) -> StepSelection:
    """Choose M on a validation split (the released code chose it on the test split, which
    leaks): the best accuracy over M in 0..max_steps, ties broken by the lower cross-entropy
    and then by fewer steps."""
    accuracy, cross_entropy = _scores_by_steps(
        model,
        val_features,
        val_labels,
        class_features,
        max_steps,
        step_size,
        batch_size,
        device,
        precision,
        backend,
        with_loss=True,
    )
    best = max(range(len(accuracy)), key=lambda m: (accuracy[m], -cross_entropy[m], -m))
    return StepSelection(best_steps=best, accuracy=accuracy, cross_entropy=cross_entropy)
