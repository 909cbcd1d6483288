"""The velocity network u(x, t): the released FMA code's DiT-style MLP, state-dict compatible."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .policy import DEFAULT_STEP_SIZE

TIME_FREQUENCY_DIM = 256
TIME_SCALE = 1000.0
LAYER_NORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int = TIME_FREQUENCY_DIM) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), cosine half first, as released."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = (t.reshape(-1, 1).float() * TIME_SCALE) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) from the time embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LAYER_NORM_EPS, elementwise_affine=True)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.in_ln(x) * (1 + scale) + shift
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=LAYER_NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class VelocityNet(nn.Module):
    """Velocity field u(x, t) of FMA (docs/method.md §2), named as released checkpoints are.

    ``dim`` is the feature dimension D, ``blocks`` the number of residual blocks and ``width``
    the hidden width (``dim`` when None, as in the released code). An untrained network outputs
    exactly zero, so solving with it leaves features unchanged.

    What a model is used with travels with it (:func:`fma_fast.load` sets these from the
    saved folder, :func:`fma_fast.save` writes them; None: not known): ``steps`` (M chosen on
    val), ``step_size`` (h), ``normalize`` (whether rows are L2-normalised before solving) and
    ``trained_on`` (the training data's record: source, class names, class table). How they
    combine with arguments: :func:`solve_settings`, :func:`normalizes`.
    """

    def __init__(self, dim: int, blocks: int = 12, width: int | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(blocks, int) or blocks < 0:
            raise ValueError(f"blocks must be a non-negative int, got {blocks!r}")
        width = dim if width is None else width
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"width must be a positive int or None, got {width!r}")
        self.dim, self.blocks, self.width = dim, blocks, width
        self.time_embed = TimestepEmbedder(width)
        self.input_proj = nn.Linear(dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(blocks))
        self.final_layer = FinalLayer(width, dim)
        self.steps: int | None = None
        self.step_size: float | None = None
        self.normalize: bool | None = None
        self.trained_on: dict[str, Any] | None = None
        self.reset_parameters()

    @property
    def config(self) -> dict:
        return {"dim": self.dim, "blocks": self.blocks, "width": self.width}

    def reset_parameters(self) -> None:
        """Released initialisation: xavier Linears, N(0, 0.02) time MLP, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero_layers = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zero_layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Velocity at features x (N, D) and times t (a scalar, (N,) or (N, 1))."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1)  # one embedding row, broadcast over the batch
        y = self.time_embed(t)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


def solve_settings(model, steps: int | None, step_size: float | None
                   ) -> tuple[int | None, float]:
    """M and h of a solve, the one precedence rule of ``solve``, ``select_steps``, ``score`` and
    ``eval``: an argument given wins, then what the model carries (``model.steps``,
    ``model.step_size``: set by :func:`fma_fast.load` from the saved folder, or by hand), then
    the default h (:data:`~fma_fast.core.policy.DEFAULT_STEP_SIZE`); M has no default (None)."""
    if steps is None:
        steps = getattr(model, "steps", None)
    if step_size is None:
        step_size = getattr(model, "step_size", None)
    return steps, DEFAULT_STEP_SIZE if step_size is None else step_size


def normalizes(model, normalize: bool | None) -> bool:
    """Whether rows are L2-normalised before a saved model solves them (``eval``, ``score``):
    ``normalize`` when given, then the model's (as it was trained), else True (models of
    fma_fast 0.1 were trained on normalised rows)."""
    if normalize is None:
        normalize = getattr(model, "normalize", None)
    return True if normalize is None else bool(normalize)
