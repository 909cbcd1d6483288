"""Pure-PyTorch reference of every FMA op: short, readable, the ground truth for the fast paths.

Shapes: features (N, D), class table (C, D), times t (N,) or (N, 1), labels (N,) int64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .names import NOISE_FORMS, NoiseForm, check_choice
from .policy import DEFAULT_STEP_SIZE, LOGIT_SCALE

DEFAULT_TIME_EPS = 1e-3
"""t is clamped to [eps, 1 - eps]: both noise forms have targets that are singular at 0 and 1."""

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reduced-precision tensors are upcast for the math; float64 stays float64 (gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def clamp_time(t: torch.Tensor, time_eps: float = DEFAULT_TIME_EPS) -> torch.Tensor:
    """t as an (N, 1) column clamped away from the singular ends 0 and 1."""
    return t.reshape(-1, 1).clamp(time_eps, 1.0 - time_eps)


def bridge_pair(
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    gamma: float,
    time_eps: float = DEFAULT_TIME_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code form (Brownian bridge): x̂_t = x_t + γ√(t(1-t))ε, v = z - x0 + γ(1-2t)/(2√(t(1-t)))ε."""
    t = clamp_time(t, time_eps)
    root = torch.sqrt(t * (1 - t))
    x_t = (1 - t) * x0 + t * z + gamma * root * noise
    target = z - x0 + gamma * (1 - 2 * t) / (2 * root) * noise
    return x_t, target


def endpoint_pair(
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor | float,
    time_eps: float = DEFAULT_TIME_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper form: x̂_t ~ N(x_t, t(1-t)σ²) per dimension, v = (z - x̂_t) / (1 - t)."""
    t = clamp_time(t, time_eps)
    x_t = (1 - t) * x0 + t * z + torch.sqrt(t * (1 - t)) * sigma * noise
    return x_t, (z - x_t) / (1 - t)


def training_pair(
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    gamma: float,
    form: NoiseForm = "bridge",
    feature_std: torch.Tensor | None = None,
    time_eps: float = DEFAULT_TIME_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input and velocity target for either noise form.

    ``gamma`` is the noise strength of both forms: the bridge's scalar γ, or for the endpoint
    form the factor on the per-dimension feature std (σ = γ·std, so γ=1 is the paper's form).
    With γ=0 both reduce to the straight line x_t and target z - x0.
    """
    if check_choice("form", form, NOISE_FORMS) == "bridge":
        return bridge_pair(x0, z, t, noise, gamma, time_eps)
    if feature_std is None:
        raise ValueError("feature_std (per-dimension std, shape (D,)) is needed for 'endpoint'")
    return endpoint_pair(x0, z, t, noise, gamma * feature_std, time_eps)


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared error summed over dimensions."""
    return (at_least_fp32(prediction) - at_least_fp32(target)).pow(2).sum(dim=-1).mean()


def euler_step(
    x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, step_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One explicit Euler step: x + h·v, t + h."""
    return x + step_size * velocity, t + step_size


def euler_solve(
    model: Velocity,
    x: torch.Tensor,
    steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    *,
    return_trajectory: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Early-stopping Euler solve from t=0: M steps of size h (t accumulates in fp32 as released).

    Returns the final features, or every state [x_0, x_1, ..., x_M] with ``return_trajectory``.
    """
    t = torch.zeros((), dtype=torch.float32, device=x.device)
    trajectory = [x]
    for _ in range(steps):
        x, t = euler_step(x, model(x, t), t, step_size)
        trajectory.append(x)
    return trajectory if return_trajectory else x


def cosine_logits(
    x: torch.Tensor, class_features: torch.Tensor, logit_scale: float | None = None
) -> torch.Tensor:
    """cos(x_n, z_c) for every row and class (N, C), times ``logit_scale`` when given."""
    x, class_features = at_least_fp32(x), at_least_fp32(class_features)
    logits = F.normalize(x, dim=-1) @ F.normalize(class_features.to(x.dtype), dim=-1).T
    return logits if logit_scale is None else logit_scale * logits


def topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores of each row of a (rows, C) matrix and their columns, best first,
    equal scores by ascending column: fma_fast's tie rule (torch.topk picks among equals as
    it likes; on the CPU the higher index). One topk of k+1 shows the rows whose k-th score
    is shared beyond the k; those alone are resolved by a stable sort of the row."""
    values, indices = scores.topk(min(k + 1, scores.shape[-1]), dim=-1)
    if values.shape[-1] > k:
        shared = values[:, k] == values[:, k - 1]
        if bool(shared.any()):
            rows = shared.nonzero()[:, 0]
            sorted_values, order = scores[rows].sort(dim=-1, descending=True, stable=True)
            values[rows], indices[rows] = sorted_values[:, :k + 1], order[:, :k + 1]
        values, indices = values[:, :k], indices[:, :k]
    indices, by_column = indices.sort(dim=-1)
    values, order = values.gather(-1, by_column).sort(dim=-1, descending=True, stable=True)
    return values, indices.gather(-1, order)


def cosine_topk(
    x: torch.Tensor, class_features: torch.Tensor, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest cosines per row and their class indices, best first (:func:`topk`)."""
    return topk(cosine_logits(x, class_features), k)


def cosine_cross_entropy(
    x: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float = LOGIT_SCALE,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(logit_scale·cos) against labels."""
    return F.cross_entropy(cosine_logits(x, class_features, logit_scale), labels)


def step_ensemble_probs(
    model: Velocity,
    x: torch.Tensor,
    class_features: torch.Tensor,
    *,
    steps: int = 10,
    ensemble_steps: Sequence[int] = (0, 4, 8),
    step_size: float = DEFAULT_STEP_SIZE,
    logit_scale: float = LOGIT_SCALE,
) -> torch.Tensor:
    """The released test code's ensemble: sum of softmax(scale·cos) at the chosen steps (N, C)."""
    if any(s < 0 or s > steps for s in ensemble_steps):
        raise ValueError(f"ensemble_steps must lie in [0, {steps}], got {list(ensemble_steps)}")
    trajectory = euler_solve(model, x, steps, step_size, return_trajectory=True)
    return sum(
        torch.softmax(cosine_logits(trajectory[s], class_features, logit_scale), dim=-1)
        for s in ensemble_steps
    )


def folded_residual_block(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A residual block with its time conditioning folded in (docs/method.md §3)."""
    normed = F.layer_norm(h, (h.shape[-1],), eps=eps)
    return h + F.silu(normed @ w1.T + b1) @ w2.T + b2


def folded_final_update(
    h: torch.Tensor, x: torch.Tensor, wf: torch.Tensor, bf: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The final layer with h folded in, added to the state: one Euler update of x."""
    return x + F.layer_norm(h, (h.shape[-1],), eps=eps) @ wf.T + bf
