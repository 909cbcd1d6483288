"""Routing of the fused ops: Triton kernels where they can run, the PyTorch reference elsewhere.

``backend="auto"`` (default) picks Triton for CUDA tensors and for CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported (the numpy interpreter: slow, for
tests), and :mod:`fma_fast.core.reference` otherwise. ``"triton"`` raises when the kernels cannot
run; ``"reference"`` always runs the reference. Every function returns a named tuple whose
``path`` field says what ran: ``"triton"``, ``"triton-interpreter"`` or ``"reference"``.

Works without triton installed: the kernel modules are imported only when a Triton path runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..core import reference
from ..core import validation as check
from ..core.names import (
    BACKENDS,
    OP_BACKENDS,
    PATH_FALLBACK,
    PATH_INTERPRETER,
    PATH_REFERENCE,
    PATH_TRITON,
    Backend,
    OpBackend,
    check_choice,
)
from ..core.policy import LOGIT_SCALE
from ..core.reference import DEFAULT_TIME_EPS
from ..kernels._common import (
    DEFAULT_DOT_PRECISION,
    interpreter_active,
    triton_usable,
    with_fallback,
)
from . import scoring


class BackendUnavailableError(RuntimeError):
    """A backend was asked for where it cannot run (the reason says why): ``backend="triton"``
    where the kernels cannot, and ``solver.compiled.CompileUnavailable``."""


class Noise(NamedTuple):
    noise: torch.Tensor
    path: str


class Pair(NamedTuple):
    """The network input x̂_t and the clamped times (N, 1) to feed the network with it."""

    x_t: torch.Tensor
    t: torch.Tensor
    path: str


class Loss(NamedTuple):
    loss: torch.Tensor
    path: str


class EulerStep(NamedTuple):
    x: torch.Tensor
    t: torch.Tensor
    path: str


class LogSumExp(NamedTuple):
    lse: torch.Tensor
    path: str


class TopK(NamedTuple):
    """(N, k) values best first and their int64 class indices."""

    values: torch.Tensor
    indices: torch.Tensor
    path: str


def select_path(backend: OpBackend, *tensors: torch.Tensor) -> str:
    """The path an op on ``tensors`` takes under ``backend`` (see the module docstring)."""
    check_choice("backend", backend, OP_BACKENDS)
    if backend == "reference":
        return PATH_REFERENCE
    usable, why = triton_usable(*tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if usable and on_cpu and any(t.dtype == torch.bfloat16 for t in tensors):
        usable, why = False, "the Triton interpreter does not support bfloat16"
    if not usable:
        if backend == "triton":
            raise BackendUnavailableError(
                f"backend='triton' requested but the kernels cannot run: {why}"
            )
        return PATH_REFERENCE
    return PATH_INTERPRETER if on_cpu and interpreter_active() else PATH_TRITON


def op_backend(backend: Backend, device: torch.device) -> OpBackend:
    """The backend for ops on ``device`` of a solve, ``fit`` or the training loss: "auto"
    means the kernels on CUDA and the torch twins on the CPU, where the kernels only run in
    Triton's slow interpreter (``backend="triton"`` asks for it, for tests)."""
    check_choice("backend", backend, BACKENDS)  # the op backends are solve backends too
    if backend in ("reference", "triton"):
        return backend
    return "auto" if device.type == "cuda" else "reference"


def _kernels(name: str):
    return importlib.import_module(f"fma_fast.kernels.{name}")


def _run(op: str, backend: str, path: str, like: torch.Tensor, kernel, torch_path):
    """``kernel()`` on a Triton path; with backend "auto" an op whose kernel cannot be built or
    launched here falls back to ``torch_path()`` (one warning, remembered). An explicit
    "triton" never falls back: the failure is raised."""
    if backend == "triton":
        return kernel(), path
    result, fell_back = with_fallback(op, like, kernel, torch_path)
    return result, PATH_FALLBACK if fell_back else path


def _check_rows(x: torch.Tensor, class_features: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2 or class_features.dim() != 2:
        raise ValueError(f"{name} and class_features must be 2-D, got shapes "
                         f"{tuple(x.shape)} and {tuple(class_features.shape)}")
    if x.shape[1] != class_features.shape[1]:
        raise ValueError(f"{name} has dim {x.shape[1]} but class_features "
                         f"{class_features.shape[1]}")


def _check_k(k: int, classes: int) -> int:
    if not isinstance(k, int) or not 1 <= k <= classes:
        raise ValueError(f"k must be an int in [1, {classes}] (the number of classes), got {k!r}")
    return k


def _check_labels(labels: torch.Tensor, rows: int, class_features: torch.Tensor,
                  checked: bool) -> torch.Tensor:
    """Labels of ``rows`` rows in [0, C): a kernel would read past the class table (on a GPU,
    an illegal address or garbage) where torch raises. The range check syncs with the device;
    ``checked=True`` (a caller that checked them once, like ``fit``) skips it."""
    if checked:
        return labels
    return check.check_labels("labels", labels, rows=rows, num_classes=class_features.shape[0])


def _unit_table(class_features: torch.Tensor, normalized: bool) -> torch.Tensor:
    return class_features if normalized else F.normalize(class_features.float(), dim=-1)


# ----------------------------------------------------------------- flow-matching training pair


def flow_matching_noise(seed: int, rows: int, dim: int, *, device: torch.device | str = "cpu",
                        backend: OpBackend = "auto") -> Noise:
    """The (rows, dim) fp32 noise ε that :func:`fused_pair` and :func:`fused_loss` use for
    ``seed`` on that path (Philox on Triton, a seeded torch.Generator on the reference)."""
    probe = torch.empty(0, device=device)
    path = select_path(backend, probe)
    if path == PATH_REFERENCE:
        return Noise(_reference_noise(seed, rows, dim, probe.device), path)
    return Noise(_kernels("flow_matching").noise(seed, rows, dim, probe.device), path)


def _reference_noise(seed: int, rows: int, dim: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn((rows, dim), generator=generator, device=device)


def _reference_pair(x0, labels, class_features, t, seed, gamma, form, feature_std, time_eps):
    noise = _reference_noise(seed, x0.shape[0], x0.shape[1], x0.device)
    return reference.training_pair(x0, class_features[labels], t, noise.to(x0.dtype),
                                   gamma=gamma, form=form, feature_std=feature_std,
                                   time_eps=time_eps)


_FLOW_MATCHING_RUNS: set[tuple] = set()


def _flow_matching_runs(x0, labels, class_features, t, gamma, form, feature_std, time_eps) -> bool:
    """Whether both flow-matching kernels (pair and loss) run here for these dtypes and D.

    They must fall back together: a pair built with the kernels' Philox noise and a loss with
    torch's would train on targets of other noise. So both are launched once on two rows
    before the first real use, and any failure sends both ops to torch.
    """
    key = (str(x0.device), x0.dtype, class_features.dtype, x0.shape[1], form)
    if key in _FLOW_MATCHING_RUNS:
        return True
    kernels = _kernels("flow_matching")
    rows = slice(0, min(2, x0.shape[0]))

    def both() -> None:
        x_t = kernels.training_input(x0[rows], labels[rows], class_features, t[rows], 0,
                                     gamma=gamma, form=form, feature_std=feature_std,
                                     time_eps=time_eps)
        # With a gradient, as in training: the kernel variant that also writes it.
        pred = x_t.detach().requires_grad_(torch.is_grad_enabled())
        kernels.flow_matching_loss(pred, x0[rows], labels[rows], class_features, t[rows], 0,
                                   gamma=gamma, form=form, feature_std=feature_std,
                                   time_eps=time_eps)

    _, fell_back = with_fallback("flow_matching", x0, both, lambda: None)
    if not fell_back:
        _FLOW_MATCHING_RUNS.add(key)
    return not fell_back


def fused_pair(x0: torch.Tensor, labels: torch.Tensor, class_features: torch.Tensor,
               t: torch.Tensor, *, seed: int, gamma: float, form: str = "bridge",
               feature_std: torch.Tensor | None = None, time_eps: float = DEFAULT_TIME_EPS,
               backend: OpBackend = "auto", labels_checked: bool = False) -> Pair:
    """Network input x̂_t for rows x0 (N, D) paired with class_features[labels], times t (N,)
    and noise drawn from ``seed`` (see ``reference.training_pair`` for the forms).

    Pass the same arguments to :func:`fused_loss`: it regenerates the same noise and target.
    Use a fresh seed per training step. ``labels`` must lie in [0, C) (checked, at the cost
    of one sync with the device, unless ``labels_checked``).
    """
    _check_rows(x0, class_features, "x0")
    labels = _check_labels(labels, x0.shape[0], class_features, labels_checked)
    path = select_path(backend, x0, labels, class_features, t)
    t_clamped = reference.clamp_time(t, time_eps)
    if path != PATH_REFERENCE and backend == "auto" and not _flow_matching_runs(
        x0, labels, class_features, t, gamma, form, feature_std, time_eps
    ):
        path = PATH_FALLBACK
    if path in (PATH_REFERENCE, PATH_FALLBACK):
        x_t, _ = _reference_pair(x0, labels, class_features, t, seed, gamma, form, feature_std,
                                 time_eps)
        return Pair(x_t, t_clamped, path)
    x_t = _kernels("flow_matching").training_input(
        x0, labels, class_features, t, seed, gamma=gamma, form=form, feature_std=feature_std,
        time_eps=time_eps)
    return Pair(x_t, t_clamped, path)


def fused_loss(pred: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor,
               class_features: torch.Tensor, t: torch.Tensor, *, seed: int, gamma: float,
               form: str = "bridge", feature_std: torch.Tensor | None = None,
               time_eps: float = DEFAULT_TIME_EPS, backend: OpBackend = "auto",
               labels_checked: bool = False) -> Loss:
    """mean_n Σ_d (pred - v)² against the target v of :func:`fused_pair` with the same
    arguments; differentiable w.r.t. ``pred`` only."""
    _check_rows(x0, class_features, "x0")
    labels = _check_labels(labels, x0.shape[0], class_features, labels_checked)
    if pred.shape != x0.shape or pred.device != x0.device:
        raise ValueError(f"pred must match x0 in shape and device, got {tuple(pred.shape)} on "
                         f"{pred.device} and {tuple(x0.shape)} on {x0.device}")
    path = select_path(backend, pred, x0, labels, class_features, t)
    if path != PATH_REFERENCE and backend == "auto" and not _flow_matching_runs(
        x0, labels, class_features, t, gamma, form, feature_std, time_eps
    ):
        path = PATH_FALLBACK
    if path in (PATH_REFERENCE, PATH_FALLBACK):
        _, target = _reference_pair(x0, labels, class_features, t, seed, gamma, form,
                                    feature_std, time_eps)
        return Loss(reference.flow_matching_loss(pred, target), path)
    loss = _kernels("flow_matching").flow_matching_loss(
        pred, x0, labels, class_features, t, seed, gamma=gamma, form=form,
        feature_std=feature_std, time_eps=time_eps)
    return Loss(loss, path)


# ------------------------------------------------------------------------------- Euler step


def euler_step(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, step_size: float, *,
               inplace: bool = False, backend: OpBackend = "auto") -> EulerStep:
    """x + h·v and t + h (t: a 0-dim fp32 device tensor). ``inplace`` updates x and t
    themselves, so a solver loop allocates nothing and never syncs with the host."""
    path = select_path(backend, x, velocity, t)
    if path == PATH_REFERENCE:
        new_x, new_t = reference.euler_step(x, velocity, t, step_size)
        if inplace:
            x.copy_(new_x)
            t.copy_(new_t)
            return EulerStep(x, t, path)
        return EulerStep(new_x, new_t, path)
    def kernel():
        return _kernels("euler").euler_step(
            x, velocity, t, step_size, out=x if inplace else None,
            t_out=t if inplace else None)

    def torch_path():
        new_x, new_t = reference.euler_step(x, velocity, t, step_size)
        if not inplace:
            return new_x, new_t
        return x.copy_(new_x), t.copy_(new_t)

    (new_x, new_t), path = _run("euler", backend, path, x, kernel, torch_path)
    return EulerStep(new_x, new_t, path)


# -------------------------------------------------------------------------------- scoring


def cosine_topk(x: torch.Tensor, class_features: torch.Tensor, k: int = 1, *,
                logit_scale: float | None = None, normalized: bool = False,
                precision: str = DEFAULT_DOT_PRECISION, backend: OpBackend = "auto") -> TopK:
    """The k largest cos(x_n, z_c) per row (times ``logit_scale`` when given), best first.

    The Triton path keeps a running top-k per row, so extra memory is O(N·k) for any number of
    classes C; the reference materialises (N, C). ``normalized=True`` promises unit-norm
    class rows (skips an O(C·D) normalised copy). ``precision`` is tl.dot's for fp32 on CUDA.
    """
    _check_rows(x, class_features)
    k = _check_k(k, class_features.shape[0])
    if logit_scale is not None:
        logit_scale = check.check_positive_float("logit_scale", logit_scale)
    path = select_path(backend, x, class_features)
    if path == PATH_REFERENCE:
        values, indices = reference.cosine_topk(x, class_features, k)
        return TopK(values if logit_scale is None else logit_scale * values, indices, path)
    table = _unit_table(class_features, normalized)
    scale = 1.0 if logit_scale is None else logit_scale

    def torch_path():
        values, indices = scoring.tiled_topk(x, table, k)
        return scale * values, indices

    (values, indices), path = _run(
        "cosine_topk", backend, path, x,
        lambda: _kernels("cosine_topk").cosine_topk(x, table, k, scale, precision), torch_path)
    return TopK(values, indices, path)


def step_ensemble_topk(states: Sequence[torch.Tensor] | torch.Tensor,
                       class_features: torch.Tensor, k: int = 1, *,
                       logit_scale: float = LOGIT_SCALE,
                       normalized: bool = False, precision: str = DEFAULT_DOT_PRECISION,
                       backend: OpBackend = "auto") -> TopK:
    """Top-k of the released step ensemble Σ_s softmax(logit_scale·cos(x_s, z)) over the
    solver states ``states`` (a list of (N, D) or an (S, N, D) tensor), best first.

    Values are the summed probabilities. Twin of ``reference.step_ensemble_probs`` + topk
    (feed it ``[trajectory[s] for s in ensemble_steps]``); the Triton path never builds N×C.
    """
    stacked = states if isinstance(states, torch.Tensor) else torch.stack(list(states))
    if stacked.dim() != 3 or stacked.shape[0] == 0:
        raise ValueError(f"states must be S >= 1 tensors of shape (N, D), "
                         f"got {tuple(stacked.shape)}")
    _check_rows(stacked[0], class_features, "states")
    k = _check_k(k, class_features.shape[0])
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    path = select_path(backend, stacked, class_features)

    def torch_path():
        probs = sum(torch.softmax(reference.cosine_logits(s, class_features, logit_scale), -1)
                    for s in stacked)
        return reference.topk(probs, k)

    if path == PATH_REFERENCE:
        return TopK(*torch_path(), path)
    (values, indices), path = _run(
        "ensemble_topk", backend, path, stacked[0],
        lambda: _kernels("step_ensemble").ensemble_topk(
            stacked, _unit_table(class_features, normalized), k, logit_scale, precision),
        torch_path)
    return TopK(values, indices, path)


def cosine_logsumexp(x: torch.Tensor, class_features: torch.Tensor,
                     logit_scale: float = LOGIT_SCALE, *, normalized: bool = False,
                     precision: str = DEFAULT_DOT_PRECISION, backend: OpBackend = "auto",
                     ) -> LogSumExp:
    """logsumexp_c(logit_scale·cos(x_n, z_c)) per row (N,), fp32, without an (N, C) matrix
    on the kernel and fallback paths (the reference builds it)."""
    _check_rows(x, class_features)
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    path = select_path(backend, x, class_features)
    if path == PATH_REFERENCE:
        lse = torch.logsumexp(reference.cosine_logits(x, class_features, logit_scale), dim=-1)
        return LogSumExp(lse, path)
    table = _unit_table(class_features, normalized)
    lse, path = _run(
        "cosine_lse", backend, path, x,
        lambda: _kernels("step_ensemble").cosine_lse(x[None], table, logit_scale,
                                                     precision)[0][0],
        lambda: scoring.tiled_logsumexp(x, table, logit_scale))
    return LogSumExp(lse, path)


def cosine_cross_entropy(x: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                         logit_scale: float = LOGIT_SCALE, *, normalized: bool = False,
                         precision: str = DEFAULT_DOT_PRECISION, backend: OpBackend = "auto",
                         labels_checked: bool = False) -> Loss:
    """Mean CE of softmax(logit_scale·cos(x, z)) against labels, differentiable w.r.t. x.

    The Triton path has no gradient for the class table, so with ``backend="auto"`` a table
    that requires grad (under grad mode) goes to the reference; ``"triton"`` raises instead.
    ``labels`` must lie in [0, C) (checked with one sync unless ``labels_checked``).
    """
    _check_rows(x, class_features)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    labels = _check_labels(labels, x.shape[0], class_features, labels_checked)
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    table_grad = class_features.requires_grad and torch.is_grad_enabled()
    if table_grad and backend == "triton":
        raise RuntimeError("the Triton cosine cross-entropy gives no gradient for class_features;"
                           " detach it or use backend='reference'")
    path = select_path("reference" if table_grad else backend, x, class_features, labels)
    if path == PATH_REFERENCE:
        return Loss(reference.cosine_cross_entropy(x, class_features, labels, logit_scale), path)
    table = _unit_table(class_features, normalized).detach()
    loss, path = _run(
        "cosine_ce", backend, path, x,
        lambda: _kernels("cosine_cross_entropy").cosine_cross_entropy(
            x, table, labels, logit_scale, precision),
        lambda: scoring.tiled_cross_entropy(x, table, labels, logit_scale))
    return Loss(loss, path)
