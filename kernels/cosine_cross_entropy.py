"""Cosine cross-entropy, mean_n CE(softmax(scale·cos(x_n, z)), y_n), without an N×C buffer.

Forward: per row block, an online log-sum-exp over class tiles (running max and rescaled sum),
the label's logit picked out of its tile; saves only O(N) statistics (lse, 1/||x||, cos_y).
Backward w.r.t. x, with p = softmax and x̂ = x/||x||:
    dx = g·scale/N · (Σ_c p_c ẑ_c - ẑ_y - x̂·(Σ_c p_c cos_c - cos_y)) / ||x||,
the projection term coming from the row normalisation. A second tiled pass recomputes p and
accumulates Σ_c p_c ẑ_c for a BLOCK_D slice of D per program (grid rows × D slices), so the
logits are recomputed once per D slice: cheap in memory, (D/BLOCK_D + 1)× the forward FLOPs.
The class table is a constant here (no dZ): ``fma_fast.ops.dispatch`` sends tables that require a
gradient to the reference instead. Untuned Hopper block sizes (see ``pick_blocks``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_arch, dot_tile, on_tensor_device, pick_blocks, row_inv_norm
from .cosine_topk import dot_operands


@triton.jit
def _forward_kernel(
    x_ptr, z_ptr, lab_ptr, loss_ptr, lse_ptr, inv_norm_ptr, cos_y_ptr,
    N, C, D, stride_x, stride_z, scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    label = tl.load(lab_ptr + rows64, mask=row_mask, other=0).to(tl.int32)
    inv_norm = row_inv_norm(x_ptr, stride_x, rows64, row_mask, D, BLOCK_N, BLOCK_D)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    cos_y = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_mask = cls < C
        cos = dot_tile(x_ptr, stride_x, rows64, row_mask, z_ptr, stride_z, cls.to(tl.int64),
                       cls_mask, D, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION) * inv_norm[:, None]
        cos_y += tl.sum(tl.where(cls[None, :] == label[:, None], cos, 0.0), axis=1)
        logits = tl.where(cls_mask[None, :], cos * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max

    lse = run_max + tl.log(run_sum)
    tl.store(loss_ptr + rows64, lse - scale * cos_y, mask=row_mask)
    tl.store(lse_ptr + rows64, lse, mask=row_mask)
    tl.store(inv_norm_ptr + rows64, inv_norm, mask=row_mask)
    tl.store(cos_y_ptr + rows64, cos_y, mask=row_mask)


@triton.jit
def _backward_kernel(
    x_ptr, z_ptr, lab_ptr, lse_ptr, inv_norm_ptr, cos_y_ptr, grad_out_ptr, dx_ptr,
    N, C, D, stride_x, stride_z, stride_dx, scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    cols64 = cols.to(tl.int64)
    lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
    inv_norm = tl.load(inv_norm_ptr + rows64, mask=row_mask, other=0.0)
    cos_y = tl.load(cos_y_ptr + rows64, mask=row_mask, other=0.0)

    p_z = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # Σ_c p_c ẑ_c on this D slice
    p_cos = tl.zeros((BLOCK_N,), tl.float32)  # Σ_c p_c cos_c
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_mask = cls < C
        cls64 = cls.to(tl.int64)
        cos = dot_tile(x_ptr, stride_x, rows64, row_mask, z_ptr, stride_z, cls64, cls_mask, D,
                       BLOCK_N, BLOCK_C, BLOCK_D, PRECISION) * inv_norm[:, None]
        p = tl.where(cls_mask[None, :], tl.exp(cos * scale - lse[:, None]), 0.0)
        p_cos += tl.sum(p * cos, axis=1)
        z = tl.load(z_ptr + cls64[:, None] * stride_z + cols64[None, :],
                    mask=cls_mask[:, None] & col_mask[None, :], other=0.0)
        p_z = tl.dot(p.to(z.dtype), z, p_z, input_precision=PRECISION)

    mask = row_mask[:, None] & col_mask[None, :]
    label = tl.load(lab_ptr + rows64, mask=row_mask, other=0).to(tl.int64)
    z_y = tl.load(z_ptr + label[:, None] * stride_z + cols64[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols64[None, :], mask=mask,
                other=0.0).to(tl.float32)
    coef = tl.load(grad_out_ptr).to(tl.float32) * scale / N * inv_norm
    dx = coef[:, None] * ((p_z - z_y) - x * (inv_norm * (p_cos - cos_y))[:, None])
    tl.store(dx_ptr + rows64[:, None] * stride_dx + cols64[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


class CosineCrossEntropy(torch.autograd.Function):
    """Fused cosine CE; gradient w.r.t. x only (the unit-norm table is a constant)."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, x, table, labels, scale, precision):
        x_op, table_op, precision = dot_operands(x, table, precision)
        labels = labels.reshape(-1).contiguous()
        n, d = x_op.shape
        c = table_op.shape[0]
        stats = torch.empty((4, n), dtype=torch.float32, device=x.device)
        row_loss, lse, inv_norm, cos_y = stats.unbind(0)
        b = pick_blocks("cosine_ce", n, d, c, x_op.dtype, arch=device_arch(x.device))
        _forward_kernel[(triton.cdiv(n, b.block_n),)](
            x_op, table_op, labels, row_loss, lse, inv_norm, cos_y, n, c, d, x_op.stride(0),
            table_op.stride(0), float(scale),
            BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d, PRECISION=precision,
            num_warps=b.num_warps, num_stages=b.num_stages,
        )
        ctx.save_for_backward(x_op, table_op, labels, lse, inv_norm, cos_y)
        ctx.scale, ctx.precision, ctx.x_dtype = float(scale), precision, x.dtype
        return row_loss.sum() / n

    @staticmethod
    @on_tensor_device
    def backward(ctx, grad_output):
        x, table, labels, lse, inv_norm, cos_y = ctx.saved_tensors
        n, d = x.shape
        c = table.shape[0]
        dx = torch.empty(x.shape, dtype=ctx.x_dtype, device=x.device)
        grad_output = grad_output.reshape(1).to(torch.float32).contiguous()
        b = pick_blocks("cosine_ce_backward", n, d, c, x.dtype,
                        arch=device_arch(x.device))
        _backward_kernel[(triton.cdiv(n, b.block_n), triton.cdiv(d, b.block_d))](
            x, table, labels, lse, inv_norm, cos_y, grad_output, dx, n, c, d, x.stride(0),
            table.stride(0), dx.stride(0), ctx.scale,
            BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d, PRECISION=ctx.precision,
            num_warps=b.num_warps, num_stages=b.num_stages,
        )
        return dx, None, None, None, None


def cosine_cross_entropy(x: torch.Tensor, table: torch.Tensor, labels: torch.Tensor,
                         scale: float = 100.0, precision: str = "tf32x3") -> torch.Tensor:
    """Mean CE of softmax(scale·cos(x, table)) against labels; ``table`` rows unit-norm."""
    return CosineCrossEntropy.apply(x, table, labels, scale, precision)
