"""Gradients through the solve: ``solve(..., differentiable=True)`` (docs/method.md §3).

The folded weights of every step are computed from the parameters by differentiable torch ops
at every call (never taken from the plan cache: the weights change at every optimizer step),
so autograd chains their gradients back to the time MLP, the adaLN, LayerNorm and Linear
parameters. One autograd Function runs the fast forward on them (the folded torch chain, or
the fused Triton step kernels) and saves only each step's input x_k, O(N·D·M) memory instead
of every block's activations of every step. Its backward walks the steps in reverse,
recomputes step k from x_k (one step's activations at a time) and runs that step's backward
as GEMMs, skipping the weight products when no folded weight needs a gradient and the last
input product when the features need none.

The folded weights keep the hidden state mean-free (the plan's centred writers), so the
LayerNorms are scalings by 1/rms; the backward differentiates that scaling. The mean
component it lets through is removed by the centring it then flows through (every product
that reads the hidden state's gradient is centred), so the gradients are the LayerNorm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..core import reference
from ..core.model import VelocityNet, timestep_embedding
from ..core.names import NETWORK_COMPILED, NETWORK_FALLBACK, NETWORK_FOLDED, NETWORK_FUSED
from ..core.policy import CPU_CHUNK_ROWS, PRECISION_DTYPES
from . import cpu, fused
from .cpu import _row_chunks as row_chunks
from .cpu import _run_chunks as run_chunks
from .cpu_ops import inverse_rms
from .plan import SolverPlan, check_finite_weights, step_times
from .routing import Route

FORWARD_TORCH = "torch"
"""float64 models (gradcheck): the forward is this module's own step, in float64."""


class FoldedWeights(NamedTuple):
    """The weights of :class:`~fma_fast.solver.plan.SolverPlan` (same layout, (in, out) matrices,
    centred writers), as differentiable functions of a model's parameters."""

    input_weight: torch.Tensor  # (D, W)
    input_bias: torch.Tensor  # (W,)
    w1: torch.Tensor  # (M, B, W, W)
    b1: torch.Tensor  # (M, B, W)
    w2: torch.Tensor  # (M, B, W, W)
    b2: torch.Tensor  # (M, B, W)
    wf: torch.Tensor  # (M, W, D)
    bf: torch.Tensor  # (M, D)


def _centred(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return weight - weight.mean(dim=dim, keepdim=True)


def compute_dtype(model) -> torch.dtype:
    """float64 for a module whose (first) parameter is float64 (gradcheck), else float32."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return torch.float64 if parameter.dtype == torch.float64 else torch.float32
    return torch.float32


def fold_weights(model: VelocityNet, steps: int, step_size: float) -> FoldedWeights:
    """The folded weights of ``steps`` steps of size ``step_size``, by autograd-tracked ops
    in the model's precision (float64 models) or fp32: the algebra of ``plan.build_plan``."""
    dtype = compute_dtype(model)

    def p(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype)

    device = model.input_proj.weight.device
    times = step_times(steps, step_size).to(device)
    t_mlp = model.time_embed.mlp
    y = F.linear(timestep_embedding(times).to(dtype), p(t_mlp[0].weight), p(t_mlp[0].bias))
    silu_y = F.silu(F.linear(F.silu(y), p(t_mlp[2].weight), p(t_mlp[2].bias)))  # (M, W)
    blocks = list(model.res_blocks)
    layer = model.final_layer.adaLN_modulation[-1]
    shift_f, scale_f = F.linear(silu_y, p(layer.weight), p(layer.bias)).chunk(2, dim=-1)
    final = p(model.final_layer.linear.weight)  # (D, W)
    wf = (final * (step_size * (1 + scale_f))[:, None, :]).transpose(1, 2)  # (M, W, D)
    bf = step_size * (p(model.final_layer.linear.bias) + shift_f @ final.T)
    input_weight = _centred(p(model.input_proj.weight), dim=0).T
    input_bias = _centred(p(model.input_proj.bias), dim=-1)
    if not blocks:
        matrices = torch.zeros(steps, 0, model.width, model.width, dtype=dtype, device=device)
        vectors = torch.zeros(steps, 0, model.width, dtype=dtype, device=device)
        return FoldedWeights(input_weight, input_bias, matrices, vectors, matrices, vectors,
                             wf.contiguous(), bf)

    def stacked(get) -> torch.Tensor:  # the blocks' parameters, (B, ...)
        return torch.stack([p(get(block)) for block in blocks])

    modulation = torch.einsum("mi,boi->mbo", silu_y,
                              stacked(lambda block: block.adaLN_modulation[-1].weight))
    modulation = modulation + stacked(lambda block: block.adaLN_modulation[-1].bias)
    shift, scale, gate = modulation.chunk(3, dim=-1)  # (M, B, W) each
    ln_weight = stacked(lambda block: block.in_ln.weight)
    col_scale = ln_weight * (1 + scale)
    col_shift = stacked(lambda block: block.in_ln.bias) * (1 + scale) + shift
    lin1 = stacked(lambda block: block.mlp[0].weight)  # (B, out, in)
    lin2 = stacked(lambda block: block.mlp[2].weight)
    # One broadcast product each: (M, B, in, out) = (in, out) matrices per step and block.
    w1 = lin1.transpose(1, 2)[None] * col_scale[..., None]
    b1 = stacked(lambda block: block.mlp[0].bias) + torch.einsum("mbi,boi->mbo", col_shift, lin1)
    w2 = _centred(lin2.transpose(1, 2)[None] * gate[:, :, None, :], dim=-1)
    b2 = _centred(gate * stacked(lambda block: block.mlp[2].bias), dim=-1)
    return FoldedWeights(input_weight, input_bias, w1, b1, w2, b2, wf.contiguous(), bf)


# ------------------------------------------------------------------- one step and its backward


def _inverse_rms(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(h²) + eps) per row: the LayerNorm scale of the mean-free hidden state."""
    return inverse_rms(hidden, hidden.new_empty(hidden.shape[0], 1), eps)


class _StepCache(NamedTuple):
    """What a step's backward reads: the normalised hidden state before each block and before
    the final layer (B + 1 GEMM operands) and its 1/rms, and each block's pre-SiLU activation
    and SiLU output (B each)."""

    normed: list[torch.Tensor]
    rstd: list[torch.Tensor]
    inner: list[torch.Tensor]
    activated: list[torch.Tensor]


def _step(x: torch.Tensor, w: FoldedWeights, k: int, eps: float, keep: bool
          ) -> tuple[torch.Tensor, _StepCache | None]:
    """x_{k+1} from x_k with the folded weights (the torch runtime's math), and with ``keep``
    the activations its backward needs."""
    cache = _StepCache([], [], [], [])
    h = torch.addmm(w.input_bias, x, w.input_weight)
    for b in range(w.w1.shape[1]):
        r = _inverse_rms(h, eps)
        normed = h * r
        a = torch.addmm(w.b1[k, b], normed, w.w1[k, b])
        activated = F.silu(a)
        if keep:
            cache.normed.append(normed)
            cache.rstd.append(r)
            cache.inner.append(a)
            cache.activated.append(activated)
        h = torch.addmm(h, activated, w.w2[k, b]).add_(w.b2[k, b])
    r = _inverse_rms(h, eps)
    normed = h.mul_(r)
    if keep:
        cache.normed.append(normed)
        cache.rstd.append(r)
    return torch.addmm(w.bf[k], normed, w.wf[k]).add_(x), cache if keep else None


def _rms_backward(grad: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dh of L(h·rstd(h)) given dL/d(normed), in place of ``grad``:
    rstd·(g − n·mean(g·n))."""
    mean = torch.linalg.vecdot(grad, normed).unsqueeze(1).div_(grad.shape[1])
    return grad.sub_(normed * mean).mul_(rstd)


def _step_backward(
    x: torch.Tensor, w: FoldedWeights, k: int, eps: float, grad_out: torch.Tensor,
    grads: list[torch.Tensor | None], input_grad: bool,
) -> torch.Tensor | None:
    """Recompute step ``k`` from its input ``x`` and run its backward: adds the step's share
    of each folded weight's gradient into ``grads`` (the input projection's, then step k's
    slices of the others; None entries are skipped) and returns dL/dx_k (None when not
    ``input_grad``), given dL/dx_{k+1} = ``grad_out``."""
    _, cache = _step(x, w, k, eps, keep=True)
    g_in_w, g_in_b, g_w1, g_b1, g_w2, g_b2, g_wf, g_bf = grads
    if g_wf is not None:
        g_wf.addmm_(cache.normed[-1].T, grad_out)
    if g_bf is not None:
        g_bf += grad_out.sum(dim=0)
    grad_h = _rms_backward(grad_out @ w.wf[k].T, cache.normed[-1], cache.rstd[-1])
    for b in reversed(range(w.w1.shape[1])):
        if g_w2 is not None:
            g_w2[b].addmm_(cache.activated[b].T, grad_h)
        if g_b2 is not None:
            g_b2[b] += grad_h.sum(dim=0)
        grad_a = torch.ops.aten.silu_backward(grad_h @ w.w2[k, b].T, cache.inner[b])
        if g_w1 is not None:
            g_w1[b].addmm_(cache.normed[b].T, grad_a)
        if g_b1 is not None:
            g_b1[b] += grad_a.sum(dim=0)
        grad_h += _rms_backward(grad_a @ w.w1[k, b].T, cache.normed[b], cache.rstd[b])
    if g_in_w is not None:
        g_in_w.addmm_(x.T, grad_h)
    if g_in_b is not None:
        g_in_b += grad_h.sum(dim=0)
    if not input_grad:
        return None
    return torch.addmm(grad_out, grad_h, w.input_weight.T)


# ----------------------------------------------------------------------- the forward runtimes


@dataclass(frozen=True)
class _Config:
    """How the Function's forward runs: steps, step size, LayerNorm eps, the runtime
    (``FORWARD_TORCH``, ``NETWORK_FOLDED`` or ``NETWORK_FUSED``), its precision, and whether
    the output is every state x_0..x_M (M+1, N, D) or x_M alone."""

    steps: int
    step_size: float
    eps: float
    runtime: str
    precision: str
    trajectory: bool


def _plan(config: _Config, w: FoldedWeights) -> SolverPlan:
    """A plan of the detached folded weights (no copy in fp32) for the fast runtimes."""
    dtype = PRECISION_DTYPES[config.precision]

    def half(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(dtype)

    return SolverPlan(
        steps=config.steps, step_size=config.step_size, eps=config.eps,
        times=step_times(config.steps, config.step_size).to(w.wf.device),
        input_weight=w.input_weight.detach().contiguous(), input_bias=w.input_bias.detach(),
        w1=half(w.w1), b1=half(w.b1), w2=half(w.w2), b2=half(w.b2), wf=half(w.wf),
        bf=half(w.bf),
    )


def _forward_states(config: _Config, x0: torch.Tensor, w: FoldedWeights) -> torch.Tensor:
    """Every state x_0..x_M, (M + 1, N, D), from the runtime of ``config``."""
    states = torch.empty(config.steps + 1, *x0.shape, dtype=w.wf.dtype, device=x0.device)
    states[0] = x0
    if config.runtime == FORWARD_TORCH:
        for k in range(config.steps):
            states[k + 1] = _step(states[k], w, k, config.eps, keep=False)[0]
        return states
    plan = _plan(config, w)
    if config.runtime == NETWORK_FUSED:
        trajectory = fused.fused_states(plan, x0)
    else:
        trajectory = cpu.folded_states(plan, x0, config.steps, config.step_size,
                                                 precision=config.precision)
    for k, state in enumerate(trajectory):
        if k:
            states[k] = state
    return states


class FoldedSolve(torch.autograd.Function):
    """x_M (or every state) of the folded solve from x_0 and the folded weights; the backward
    recomputes one step at a time from the saved step inputs."""

    @staticmethod
    def forward(ctx, config: _Config, x0: torch.Tensor, *weights: torch.Tensor):
        w = FoldedWeights(*weights)
        states = _forward_states(config, x0, w)
        if config.trajectory:
            ctx.save_for_backward(states, *weights)  # (an output: no copy)
            ctx.config = config
            return states
        ctx.save_for_backward(states[: config.steps], *weights)
        ctx.config = config
        return states[config.steps].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        config = ctx.config
        states, *weights = ctx.saved_tensors
        w = FoldedWeights(*weights)
        grads = [torch.zeros_like(t) if needed else None
                 for t, needed in zip(weights, ctx.needs_input_grad[2:])]
        grad_x = grad[config.steps] if config.trajectory else grad
        backward_step = _ChunkedBackward(states.shape[1], w.wf.device, grads)
        for k in reversed(range(config.steps)):
            input_grad = k > 0 or ctx.needs_input_grad[1]
            grad_x = backward_step(states[k], w, k, config.eps, grad_x, input_grad)
            if config.trajectory and grad_x is not None:
                grad_x = grad_x + grad[k]
        return None, grad_x, *grads


class _ChunkedBackward:
    """One step's backward over all rows. On the CPU with several threads, as the torch
    runtime runs its forward: row chunks advanced by worker threads with single-threaded ops
    (no OpenMP barrier per op), each worker adding its chunks' weight gradients into its own
    buffers for the step, summed into the step's gradients at the end of the step."""

    def __init__(self, rows: int, device: torch.device, grads: list[torch.Tensor | None]):
        self.grads = grads
        workers = torch.get_num_threads() if device.type == "cpu" else 1
        self.chunks = row_chunks(rows, CPU_CHUNK_ROWS, workers) if workers > 1 else []
        self.workers = min(workers, len(self.chunks))

    def _step_slices(self, k: int, grads: list[torch.Tensor | None]) -> list:
        return [g if g is None or i < 2 else g[k] for i, g in enumerate(grads)]

    def __call__(self, x, w: FoldedWeights, k: int, eps: float, grad_out: torch.Tensor,
                 input_grad: bool) -> torch.Tensor | None:
        if self.workers <= 1:
            return _step_backward(x, w, k, eps, grad_out, self._step_slices(k, self.grads),
                                  input_grad)
        grad_x = torch.empty_like(x) if input_grad else None
        partial = [[None if g is None else torch.zeros_like(g)
                    for g in self._step_slices(k, self.grads)] for _ in range(self.workers)]

        def run(rows: slice, sums: list) -> None:
            found = _step_backward(x[rows], w, k, eps, grad_out[rows], sums, input_grad)
            if found is not None:
                grad_x[rows] = found

        run_chunks(self.chunks, partial, run)
        for total, *parts in zip(self._step_slices(k, self.grads), *partial):
            for part in parts if total is not None else ():
                total += part
        return grad_x


# ----------------------------------------------------------------------------- the solve


def plain_solve(model, x: torch.Tensor, steps: int, route: Route,
                trajectory: bool = False) -> torch.Tensor:
    """Autograd through the plain Euler loop (any velocity callable), each velocity checked
    like the solver's (shape, NaN/Inf); bf16/fp16 routes autocast the calls."""
    t = torch.zeros((), dtype=torch.float32, device=x.device)
    states = [x]
    low = route.precision != "fp32"
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=route.dtype, enabled=low):
            velocity = model(x, t)
        if not isinstance(velocity, torch.Tensor) or velocity.shape != x.shape:
            got = tuple(velocity.shape) if isinstance(velocity, torch.Tensor) else type(velocity)
            raise ValueError(
                f"model(x, t) must return velocities of shape {tuple(x.shape)}, got {got}")
        x, t = reference.euler_step(x, velocity.to(x.dtype), t, route.step_size)
        states.append(x)
    return torch.stack(states) if trajectory else x


def differentiable_solve(model, x: torch.Tensor, steps: int, route: Route, *,
                         trajectory: bool = False) -> torch.Tensor:
    """x_M (or the (M + 1, N, D) states with ``trajectory``) attached to autograd, computed on
    ``route.device`` in fp32 (float64 for a float64 VelocityNet), on x's device. ``x`` is
    checked by the caller (finite, a matrix of the model's dim).

    ``route`` comes from ``routing.resolve`` without probing the kernels: a VelocityNet runs
    :class:`FoldedSolve` (a fused route launches the kernels once on these weights here and
    takes the torch chain where they fail), anything else the plain loop."""
    if route.network == NETWORK_COMPILED:
        raise ValueError("backend='compiled' has no backward: use backend='auto' or 'folded' "
                         "with differentiable=True")
    folded = route.network in (NETWORK_FOLDED, NETWORK_FALLBACK, NETWORK_FUSED)
    dtype = compute_dtype(model)
    if dtype == torch.float64 and route.precision != "fp32":
        raise ValueError(f"a float64 model runs in float64; precision={route.precision!r} "
                         "is for float32 models")
    source = x.device
    start = x.to(route.device, dtype)
    if steps == 0:
        result = torch.stack([start]) if trajectory else start.clone()
        return result.to(source)
    if not folded:
        result = plain_solve(model, start, steps, route, trajectory)
    else:
        check_finite_weights(model)
        weights = fold_weights(model, steps, route.step_size)
        runtime = FORWARD_TORCH if dtype == torch.float64 else route.network
        if runtime == NETWORK_FALLBACK:
            runtime = NETWORK_FOLDED
        config = _Config(steps, route.step_size, model.final_layer.norm_final.eps, runtime,
                         route.precision, trajectory)
        if (runtime == NETWORK_FUSED and route.op_backend != "triton"
                and not fused.kernels_run(_plan(config, weights))):
            config = _Config(steps, route.step_size, config.eps, NETWORK_FOLDED,
                             route.precision, trajectory)
        result = FoldedSolve.apply(config, start, *weights)
    final = result[-1] if trajectory else result
    if not bool(torch.isfinite(final.detach().sum())):
        raise ValueError(
            f"the solve produced NaN or Inf after {steps} steps: the model's velocities are "
            "not finite; check its weights or its forward")
    return result.to(source)
