"""Fused cosine scoring with a running top-k: cos(x_n, z_c) for all classes, keeping only k.

The (N, C) score matrix never exists: each program owns BLOCK_N rows, walks the class table in
BLOCK_C tiles (tl.dot over BLOCK_D chunks of D) and folds every tile into K running slots held in
registers. Extra memory is the (N, k) output, whatever C is. The table must be L2-normalised by
the caller (once, O(C·D)); rows of x are normalised in-kernel by scaling the dot products.
Block sizes are untuned Hopper guesses (see ``pick_blocks``); ``FMA_FAST_AUTOTUNE=1`` times
the ``candidate_blocks`` on the GPU at hand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Blocks,
    check_dot_precision,
    dot_tile,
    merge_topk,
    on_tensor_device,
    row_inv_norm,
    row_major,
    tuned_blocks,
)


@triton.jit
def _cosine_topk_kernel(
    x_ptr, z_ptr, val_ptr, idx_ptr,
    N, C, D, stride_x, stride_z, scale,
    K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    inv_norm = row_inv_norm(x_ptr, stride_x, rows64, row_mask, D, BLOCK_N, BLOCK_D)

    slots = tl.arange(0, K_PAD)
    top_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros(
        (BLOCK_N, K_PAD), tl.float32)
    top_i = tl.zeros((BLOCK_N, K_PAD), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cls_mask = cls < C
        dots = dot_tile(x_ptr, stride_x, rows64, row_mask, z_ptr, stride_z, cls.to(tl.int64),
                        cls_mask, D, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION)
        scores = tl.where(cls_mask[None, :], dots * inv_norm[:, None], float("-inf"))
        top_v, top_i = merge_topk(top_v, top_i, scores, cls, K, K_PAD)

    out = rows64[:, None] * K + slots[None, :]
    out_mask = row_mask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, top_v * scale, mask=out_mask)
    tl.store(idx_ptr + out, top_i.to(tl.int64), mask=out_mask)


def k_slots(k: int) -> int:
    """Register slots for a running top-k: a power of two >= max(k, 2)."""
    return triton.next_power_of_2(max(k, 2))


def dot_operands(x: torch.Tensor, table: torch.Tensor, precision: str
                 ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """x and the table in one dtype for tl.dot (half inputs use tensor cores natively; the
    fp32 precision setting only matters for fp32 operands)."""
    precision = check_dot_precision(precision)
    x = row_major(x)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    table = row_major(table.to(x.dtype))
    return x, table, precision if x.dtype == torch.float32 else "tf32"


@on_tensor_device
def unsorted_topk(x: torch.Tensor, table: torch.Tensor, k: int, scale: float = 1.0,
                  precision: str = "tf32x3", blocks: Blocks | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best ``scale``·cos(x_n, table_c) per row, in no particular order: (N, k) fp32
    values and int64 indices. ``table`` rows must already be unit-norm. ``blocks`` overrides
    the launch configuration (default: :func:`tuned_blocks`)."""
    x, table, precision = dot_operands(x, table, precision)
    n, d = x.shape
    c = table.shape[0]

    def launch(b: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.empty((n, k), dtype=torch.float32, device=x.device)
        indices = torch.empty((n, k), dtype=torch.int64, device=x.device)
        _cosine_topk_kernel[(triton.cdiv(n, b.block_n),)](
            x, table, values, indices, n, c, d, x.stride(0), table.stride(0), float(scale),
            K=k, K_PAD=k_slots(k), BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d,
            PRECISION=precision, num_warps=b.num_warps, num_stages=b.num_stages,
        )
        return values, indices

    if blocks is None:
        blocks = tuned_blocks("cosine_topk", n, d, c, x.dtype, x.device, launch)
    return launch(blocks)


def sort_topk(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order (N, k) candidates best first, equal values by ascending class (the slots hold
    them in no order): O(N·k), never O(N·C)."""
    indices, by_class = indices.sort(dim=1)
    values, order = values.gather(1, by_class).sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def cosine_topk(x: torch.Tensor, table: torch.Tensor, k: int, scale: float = 1.0,
                precision: str = "tf32x3") -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first top-k of ``scale``·cos(x, table) (table rows unit-norm)."""
    return sort_topk(*unsorted_topk(x, table, k, scale, precision))
