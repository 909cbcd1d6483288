"""The released test code's step ensemble, Σ_s softmax(scale·cos(x_s, z))_c, top-k without N×C.

Two tiled passes over the class table, neither storing scores:
(a) per state s and row, the log-sum-exp of scale·cos over all classes, computed online (running
    max and rescaled sum) tile by tile, plus the row's inverse norm;
(b) per class tile, the ensemble score Σ_s exp(scale·cos(x_s, z_c) - lse_s) recomputed from the
    states, folded into a running top-k as in ``cosine_topk``.
Extra memory is O(S·N + N·k). Block sizes are untuned Hopper guesses (see ``pick_blocks``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    device_arch,
    dot_tile,
    merge_topk,
    on_tensor_device,
    pick_blocks,
    row_inv_norm,
)
from .cosine_topk import dot_operands, k_slots, sort_topk


@triton.jit
def _cosine_lse_kernel(
    x_ptr, z_ptr, lse_ptr, inv_norm_ptr,
    N, C, D, stride_s, stride_x, stride_z, scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    state = tl.program_id(1).to(tl.int64)
    x_ptr += state * stride_s
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    inv_norm = row_inv_norm(x_ptr, stride_x, rows64, row_mask, D, BLOCK_N, BLOCK_D)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_mask = cls < C
        dots = dot_tile(x_ptr, stride_x, rows64, row_mask, z_ptr, stride_z, cls.to(tl.int64),
                        cls_mask, D, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION)
        logits = tl.where(cls_mask[None, :], dots * (inv_norm * scale)[:, None], float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max

    out = state * N + rows64
    tl.store(lse_ptr + out, run_max + tl.log(run_sum), mask=row_mask)
    tl.store(inv_norm_ptr + out, inv_norm, mask=row_mask)


@triton.jit
def _ensemble_topk_kernel(
    x_ptr, z_ptr, lse_ptr, inv_norm_ptr, val_ptr, idx_ptr,
    S, N, C, D, stride_s, stride_x, stride_z, scale,
    K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)

    slots = tl.arange(0, K_PAD)
    top_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros(
        (BLOCK_N, K_PAD), tl.float32)
    top_i = tl.zeros((BLOCK_N, K_PAD), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_mask = cls < C
        probs = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        for s in range(0, S):
            s64 = tl.cast(s, tl.int64)
            lse = tl.load(lse_ptr + s64 * N + rows64, mask=row_mask, other=0.0)
            inv_norm = tl.load(inv_norm_ptr + s64 * N + rows64, mask=row_mask, other=0.0)
            dots = dot_tile(x_ptr + s64 * stride_s, stride_x, rows64, row_mask, z_ptr, stride_z,
                            cls.to(tl.int64), cls_mask, D, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION)
            probs += tl.exp(dots * (inv_norm * scale)[:, None] - lse[:, None])
        probs = tl.where(cls_mask[None, :], probs, float("-inf"))
        top_v, top_i = merge_topk(top_v, top_i, probs, cls, K, K_PAD)

    out = rows64[:, None] * K + slots[None, :]
    out_mask = row_mask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, top_v, mask=out_mask)
    tl.store(idx_ptr + out, top_i.to(tl.int64), mask=out_mask)


def _stacked(states: torch.Tensor, table: torch.Tensor, precision: str):
    """(S, N, D) states and the table in one dot dtype, rows unit-stride."""
    s, n, d = states.shape
    flat, table, precision = dot_operands(states.reshape(s * n, d), table, precision)
    return flat.reshape(s, n, d), table, precision


@on_tensor_device
def cosine_lse(states: torch.Tensor, table: torch.Tensor, scale: float,
               precision: str = "tf32x3") -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp_c(scale·cos(x_s,n, z_c)) and 1/||x_s,n|| for (S, N, D) states: two (S, N)
    fp32 tensors. ``table`` rows must be unit-norm."""
    states, table, precision = _stacked(states, table, precision)
    s, n, d = states.shape
    c = table.shape[0]
    lse = torch.empty((s, n), dtype=torch.float32, device=states.device)
    inv_norm = torch.empty_like(lse)
    b = pick_blocks("cosine_lse", n, d, c, states.dtype, arch=device_arch(states.device))
    _cosine_lse_kernel[(triton.cdiv(n, b.block_n), s)](
        states, table, lse, inv_norm, n, c, d, states.stride(0), states.stride(1),
        table.stride(0), float(scale),
        BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d, PRECISION=precision,
        num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return lse, inv_norm


@on_tensor_device
def ensemble_topk(states: torch.Tensor, table: torch.Tensor, k: int, scale: float,
                  precision: str = "tf32x3") -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first top-k of Σ_s softmax(scale·cos(x_s, z)) for (S, N, D) states: (N, k) fp32
    probability sums and int64 class indices. ``table`` rows must be unit-norm."""
    states, table, precision = _stacked(states, table, precision)
    s, n, d = states.shape
    c = table.shape[0]
    lse, inv_norm = cosine_lse(states, table, scale, precision)
    values = torch.empty((n, k), dtype=torch.float32, device=states.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=states.device)
    b = pick_blocks("ensemble_topk", n, d, c, states.dtype,
                    arch=device_arch(states.device))
    _ensemble_topk_kernel[(triton.cdiv(n, b.block_n),)](
        states, table, lse, inv_norm, values, indices, s, n, c, d, states.stride(0),
        states.stride(1), table.stride(0), float(scale),
        K=k, K_PAD=k_slots(k), BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d,
        PRECISION=precision, num_warps=b.num_warps, num_stages=b.num_stages,
    )
    return sort_topk(values, indices)
