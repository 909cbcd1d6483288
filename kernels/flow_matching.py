"""Fused flow-matching training pair and loss with in-kernel Philox noise.

One seed defines the noise ε[n, d] = tl.randn(seed, n·D + d) (int64 offsets). The pair kernel
writes only the network input x̂_t; the loss kernel regenerates the same ε and gathers the
same target row z = table[label], so neither the noise nor the velocity target is ever stored
in HBM. Both forms of ``reference.training_pair`` are covered (FORM 0: bridge, 1: endpoint).
Tiles are untuned Hopper guesses (see ``pick_blocks``): these kernels are bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.names import check_choice
from ._common import on_tensor_device, pick_blocks, row_major

FORMS = {"bridge": 0, "endpoint": 1}

SEED = ("seed",)
"""Arguments Triton must not specialise on their value: a fresh seed every training step would
otherwise compile a variant for seed 1 and one for multiples of 16. (Seeds from 2**31 on are
int64 arguments: one more variant, compiled once.)"""


@triton.jit
def _pair_tile(x0_ptr, z_ptr, t_ptr, lab_ptr, std_ptr, seed, rows, cols, N, D,
               stride_x0, stride_z, gamma, t_lo, t_hi, FORM: tl.constexpr):
    """x̂_t and the target v for a (rows × cols) tile, fp32, plus the tile mask."""
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    t = tl.load(t_ptr + rows64, mask=row_mask, other=0.5).to(tl.float32)
    t = tl.minimum(tl.maximum(t, t_lo), t_hi)[:, None]
    label = tl.load(lab_ptr + rows64, mask=row_mask, other=0).to(tl.int64)
    x0 = tl.load(x0_ptr + rows64[:, None] * stride_x0 + cols64[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    z = tl.load(z_ptr + label[:, None] * stride_z + cols64[None, :], mask=mask,
                other=0.0).to(tl.float32)
    noise = tl.randn(seed, rows64[:, None] * D + cols64[None, :])
    root = tl.sqrt(t * (1.0 - t))
    line = (1.0 - t) * x0 + t * z
    if FORM == 0:
        x_t = line + gamma * root * noise
        target = z - x0 + gamma * (1.0 - 2.0 * t) / (2.0 * root) * noise
    else:
        sigma = gamma * tl.load(std_ptr + cols64, mask=col_mask, other=0.0).to(tl.float32)
        x_t = line + root * sigma[None, :] * noise
        target = (z - x_t) / (1.0 - t)
    return x_t, target, mask, rows64, cols64


@triton.jit(do_not_specialize=SEED)
def _pair_kernel(x0_ptr, z_ptr, t_ptr, lab_ptr, std_ptr, out_ptr, seed, N, D,
                 stride_x0, stride_z, stride_out, gamma, t_lo, t_hi,
                 FORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    x_t, _, mask, rows64, cols64 = _pair_tile(
        x0_ptr, z_ptr, t_ptr, lab_ptr, std_ptr, seed, rows, cols, N, D, stride_x0, stride_z,
        gamma, t_lo, t_hi, FORM)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols64[None, :],
             x_t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=SEED)
def _loss_kernel(pred_ptr, x0_ptr, z_ptr, t_ptr, lab_ptr, std_ptr, row_loss_ptr, grad_ptr,
                 seed, N, D, stride_pred, stride_x0, stride_z, gamma, t_lo, t_hi, grad_scale,
                 FORM: tl.constexpr, WRITE_GRAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row Σ_d (pred - v)² and, when asked, grad = grad_scale·(pred - v) in fp32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        _, target, mask, rows64, cols64 = _pair_tile(
            x0_ptr, z_ptr, t_ptr, lab_ptr, std_ptr, seed, rows, cols, N, D, stride_x0,
            stride_z, gamma, t_lo, t_hi, FORM)
        offs = rows64[:, None] * stride_pred + cols64[None, :]
        pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, pred - target, 0.0)
        acc += tl.sum(diff * diff, axis=1)
        if WRITE_GRAD:
            grad_offs = rows64[:, None] * D + cols64[None, :]
            tl.store(grad_ptr + grad_offs, grad_scale * diff, mask=mask)
    tl.store(row_loss_ptr + rows.to(tl.int64), acc, mask=rows < N)


@triton.jit(do_not_specialize=SEED)
def _noise_kernel(out_ptr, seed, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows64 = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols64 = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    offs = rows64[:, None] * D + cols64[None, :]
    mask = (rows64 < N)[:, None] & (cols64 < D)[None, :]
    tl.store(out_ptr + offs, tl.randn(seed, offs), mask=mask)


def _time_bounds(time_eps: float) -> tuple[float, float]:
    """The clamp bounds of ``reference.clamp_time`` rounded to fp32 like torch.clamp does."""
    bounds = torch.tensor([time_eps, 1.0 - time_eps], dtype=torch.float32)
    return float(bounds[0]), float(bounds[1])


def _prepare(x0, labels, table, t, feature_std, form):
    check_choice("form", form, FORMS)
    if form == "endpoint" and feature_std is None:
        raise ValueError("feature_std (per-dimension std, shape (D,)) is needed for 'endpoint'")
    x0, table = row_major(x0), row_major(table)
    t = t.reshape(-1).contiguous()
    labels = labels.reshape(-1).contiguous()
    std = feature_std.reshape(-1).contiguous() if feature_std is not None else t
    return x0, labels, table, t, std


def noise(seed: int, rows: int, dim: int, device: torch.device | str) -> torch.Tensor:
    """The (rows, dim) fp32 noise the kernels generate from ``seed`` (for tests and debugging)."""
    return _fill_noise(torch.empty((rows, dim), dtype=torch.float32, device=device), int(seed))


@on_tensor_device
def _fill_noise(out: torch.Tensor, seed: int) -> torch.Tensor:
    rows, dim = out.shape
    b = pick_blocks("noise", rows, dim)
    grid = (triton.cdiv(rows, b.block_n), triton.cdiv(dim, b.block_d))
    _noise_kernel[grid](out, seed, rows, dim, BLOCK_N=b.block_n, BLOCK_D=b.block_d,
                        num_warps=b.num_warps)
    return out


@on_tensor_device
def training_input(x0: torch.Tensor, labels: torch.Tensor, table: torch.Tensor, t: torch.Tensor,
                   seed: int, *, gamma: float, form: str = "bridge",
                   feature_std: torch.Tensor | None = None, time_eps: float = 1e-3
                   ) -> torch.Tensor:
    """x̂_t (N, D) in x0's dtype for rows x0, targets table[labels], times t, noise from seed."""
    x0, labels, table, t, std = _prepare(x0, labels, table, t, feature_std, form)
    n, d = x0.shape
    out = torch.empty_like(x0)
    t_lo, t_hi = _time_bounds(time_eps)
    b = pick_blocks("flow_matching", n, d)
    grid = (triton.cdiv(n, b.block_n), triton.cdiv(d, b.block_d))
    _pair_kernel[grid](
        x0, table, t, labels, std, out, int(seed), n, d, x0.stride(0), table.stride(0),
        out.stride(0), float(gamma), t_lo, t_hi,
        FORM=FORMS[form], BLOCK_N=b.block_n, BLOCK_D=b.block_d, num_warps=b.num_warps,
    )
    return out


class FlowMatchingLoss(torch.autograd.Function):
    """mean_n Σ_d (pred - v)², v regenerated in-kernel. Forward also writes 2(pred - v)/N when
    pred needs a gradient (one pass, no recompute); backward scales it by grad_output. The
    stored gradient is fp32 even for half ``pred``: a GradScaler's factor arrives in
    grad_output, and scaling after a cast to fp16 would lose the small gradients it exists
    to keep. x0, the table, t and the labels are data: they get no gradient."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, pred, x0, labels, table, t, feature_std, seed, gamma, form, time_eps):
        x0, labels, table, t, std = _prepare(x0, labels, table, t, feature_std, form)
        pred_rm = row_major(pred)
        n, d = pred_rm.shape
        if x0.shape != (n, d):
            raise ValueError(f"pred has shape {tuple(pred.shape)} but x0 {tuple(x0.shape)}")
        write_grad = ctx.needs_input_grad[0]
        row_loss = torch.empty(n, dtype=torch.float32, device=pred.device)
        grad = row_loss  # an unused pointer unless the gradient is written
        if write_grad:
            grad = torch.empty((n, d), dtype=torch.float32, device=pred.device)
        t_lo, t_hi = _time_bounds(time_eps)
        b = pick_blocks("flow_matching", n, d)
        _loss_kernel[(triton.cdiv(n, b.block_n),)](
            pred_rm, x0, table, t, labels, std, row_loss, grad, int(seed), n, d,
            pred_rm.stride(0), x0.stride(0), table.stride(0), float(gamma), t_lo, t_hi, 2.0 / n,
            FORM=FORMS[form], WRITE_GRAD=write_grad, BLOCK_N=b.block_n, BLOCK_D=b.block_d,
            num_warps=b.num_warps,
        )
        if write_grad:
            ctx.save_for_backward(grad)
            ctx.pred_dtype = pred.dtype
        return row_loss.sum() / n

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return ((grad * grad_output).to(ctx.pred_dtype),) + (None,) * 9


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor,
                       table: torch.Tensor, t: torch.Tensor, seed: int, *, gamma: float,
                       form: str = "bridge", feature_std: torch.Tensor | None = None,
                       time_eps: float = 1e-3) -> torch.Tensor:
    """Differentiable (w.r.t. ``pred``) fused loss against the pair defined by the same
    arguments as :func:`training_input`."""
    return FlowMatchingLoss.apply(pred, x0, labels, table, t, feature_std, int(seed),
                                  float(gamma), form, float(time_eps))
