"""Fused kernels of one folded solver step (docs/method.md §3): residual block, final layer + Euler.

With the time conditioning folded into the weights, a residual block is
``h + SiLU(LN(h) @ W1'ᵀ + b1') @ W2'ᵀ + b2'`` and the final layer with the Euler update is
``x + LN(h) @ Wf'ᵀ + bf'`` (h is folded into Wf', bf'). LN has no affine part left.

Block kernel, per program of BLOCK_M rows: LayerNorm statistics in a first pass over the row
tile; then for each BLOCK_H slice of the hidden layer, GEMM1 on the normalised rows (normalised
as they are loaded), bias and SiLU in registers, and at once GEMM2 of that slice into a
(BLOCK_M, WIDTH_PAD) fp32 accumulator: the hidden activations never leave the chip. The residual
and b2' are added in the epilogue. Operands go to the tensor cores in the weights' dtype
(bf16/fp16, or fp32 as TF32x3 on CUDA) with fp32 accumulation; the residual stream stays fp32.

The accumulator holds BLOCK_M × WIDTH_PAD fp32 values, so BLOCK_M shrinks as the width grows.
Block shapes and warps are Hopper-minded starting points from :func:`pick_blocks`, **untuned**:
no GPU was available when they were written. ``FMA_FAST_AUTOTUNE=1`` times the
:func:`candidate_blocks` once per shape on the GPU at hand and keeps the fastest. Inference
only (no autograd): the solver runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DEFAULT_DOT_PRECISION, Blocks, on_tensor_device, row_major, tuned_blocks


@triton.jit
def _row_stats(
    h_ptr, rows64, row_mask, stride_h, width, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Mean and 1/std of each row (two passes over the tile, which sits in L1/L2)."""
    total = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, width, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < width)[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        total += tl.sum(h.to(tl.float32), axis=1)
    mean = total / width
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, width, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < width)[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        centred = tl.where(mask, h.to(tl.float32) - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, 1.0 / tl.sqrt(squares / width + eps)


@triton.jit
def _normalised_gemm(
    h_ptr,
    rows64,
    row_mask,
    stride_h,
    mean,
    rstd,
    w_ptr,
    stride_wo,
    stride_wi,
    out0,
    n_out,
    width,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """LN(h_rows) @ W[out0:out0+BLOCK_OUT, :]ᵀ as a (BLOCK_M, BLOCK_OUT) fp32 tile."""
    outs = out0 + tl.arange(0, BLOCK_OUT)
    out_mask = outs < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
    for k0 in range(0, width, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < width
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        a = tl.where(mask, (h.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(
            w_ptr + outs.to(tl.int64)[None, :] * stride_wo + cols[:, None] * stride_wi,
            mask=out_mask[None, :] & col_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["n_rows"])  # one variant for every batch (solver/fused.py's probe)
def _residual_block_kernel(
    h_ptr,
    out_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    n_rows,
    width,
    stride_h,
    stride_out,
    stride_w1o,
    stride_w1i,
    stride_w2o,
    stride_w2i,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    mean, rstd = _row_stats(h_ptr, rows64, row_mask, stride_h, width, eps, BLOCK_M, BLOCK_K)
    outs = tl.arange(0, WIDTH_PAD)
    out_mask = outs < width
    acc = tl.zeros((BLOCK_M, WIDTH_PAD), tl.float32)
    for j0 in range(0, width, BLOCK_H):
        hidden_idx = j0 + tl.arange(0, BLOCK_H)
        hidden_mask = hidden_idx < width
        hidden = _normalised_gemm(
            h_ptr,
            rows64,
            row_mask,
            stride_h,
            mean,
            rstd,
            w1_ptr,
            stride_w1o,
            stride_w1i,
            j0,
            width,
            width,
            BLOCK_M,
            BLOCK_K,
            BLOCK_H,
            PRECISION,
        )
        hidden += tl.load(b1_ptr + hidden_idx, mask=hidden_mask, other=0.0).to(tl.float32)[None, :]
        hidden = hidden * tl.sigmoid(hidden)  # SiLU; padded columns stay exactly 0
        w2 = tl.load(
            w2_ptr + outs.to(tl.int64)[None, :] * stride_w2o + hidden_idx[:, None] * stride_w2i,
            mask=out_mask[None, :] & hidden_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(hidden.to(w2.dtype), w2, acc, input_precision=PRECISION)
    mask = row_mask[:, None] & out_mask[None, :]
    residual = tl.load(h_ptr + rows64[:, None] * stride_h + outs[None, :], mask=mask, other=0.0)
    bias = tl.load(b2_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)
    result = residual.to(tl.float32) + acc + bias[None, :]
    tl.store(
        out_ptr + rows64[:, None] * stride_out + outs[None, :],
        result.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit(do_not_specialize=["n_rows"])
def _final_euler_kernel(
    h_ptr,
    x_ptr,
    out_ptr,
    wf_ptr,
    bf_ptr,
    n_rows,
    width,
    dim,
    stride_h,
    stride_x,
    stride_out,
    stride_wfo,
    stride_wfi,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    mean, rstd = _row_stats(h_ptr, rows64, row_mask, stride_h, width, eps, BLOCK_M, BLOCK_K)
    d0 = tl.program_id(1) * BLOCK_D
    step = _normalised_gemm(
        h_ptr,
        rows64,
        row_mask,
        stride_h,
        mean,
        rstd,
        wf_ptr,
        stride_wfo,
        stride_wfi,
        d0,
        dim,
        width,
        BLOCK_M,
        BLOCK_K,
        BLOCK_D,
        PRECISION,
    )
    cols = d0 + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    bias = tl.load(bf_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    result = x.to(tl.float32) + step + bias[None, :]
    tl.store(
        out_ptr + rows64[:, None] * stride_out + cols[None, :],
        result.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _check_weight(name: str, w: torch.Tensor, shape: tuple[int, int], like: torch.Tensor) -> None:
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(w.shape)}")
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but the activations are on {like.device}")


@on_tensor_device
def residual_block(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    precision: str = DEFAULT_DOT_PRECISION,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """One folded residual block on fp32 activations ``h`` (N, W); ``out=h`` works in place
    (each program reads all of its rows before it writes them). Weights are (out, in) like
    ``nn.Linear``; any strides work, so a transposed (in, out) view needs no copy. ``blocks``
    overrides the launch configuration (default: :func:`tuned_blocks`)."""
    rows, width = h.shape
    for name, w in (("w1", w1), ("w2", w2)):
        _check_weight(name, w, (width, width), h)
    h = row_major(h)
    out = torch.empty_like(h) if out is None else out

    def launch(b: Blocks, target: torch.Tensor) -> None:
        _residual_block_kernel[(triton.cdiv(rows, b.block_n),)](
            h,
            target,
            w1,
            b1,
            w2,
            b2,
            rows,
            width,
            h.stride(0),
            target.stride(0),
            *w1.stride(),
            *w2.stride(),
            eps,
            BLOCK_M=b.block_n,
            BLOCK_K=b.block_d,
            BLOCK_H=b.block_c,
            WIDTH_PAD=max(16, triton.next_power_of_2(width)),
            PRECISION=precision,
            num_warps=b.num_warps,
            num_stages=b.num_stages,
        )

    if blocks is None:
        blocks = tuned_blocks("folded_block", rows, width, 1, w1.dtype, h.device,
                              lambda b: launch(b, torch.empty_like(h)))
    launch(blocks, out)
    return out


@on_tensor_device
def final_euler_update(
    h: torch.Tensor,
    x: torch.Tensor,
    wf: torch.Tensor,
    bf: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    precision: str = DEFAULT_DOT_PRECISION,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """x + LN(h) @ Wf'ᵀ + bf' (the step size is folded into Wf', bf'); ``out=x`` in place.
    ``blocks`` overrides the launch configuration (default: :func:`tuned_blocks`)."""
    rows, width = h.shape
    dim = x.shape[1]
    if x.shape[0] != rows:
        raise ValueError(f"x has {x.shape[0]} rows but the hidden state {rows}")
    _check_weight("wf", wf, (dim, width), h)
    h, x = row_major(h), row_major(x)
    out = torch.empty_like(x) if out is None else out

    def launch(b: Blocks, target: torch.Tensor) -> None:
        grid = (triton.cdiv(rows, b.block_n), triton.cdiv(dim, b.block_c))
        _final_euler_kernel[grid](
            h,
            x,
            target,
            wf,
            bf,
            rows,
            width,
            dim,
            h.stride(0),
            x.stride(0),
            target.stride(0),
            *wf.stride(),
            eps,
            BLOCK_M=b.block_n,
            BLOCK_K=b.block_d,
            BLOCK_D=b.block_c,
            PRECISION=precision,
            num_warps=b.num_warps,
            num_stages=b.num_stages,
        )

    if blocks is None:
        blocks = tuned_blocks("folded_final", rows, width, dim, wf.dtype, h.device,
                              lambda b: launch(b, torch.empty_like(x)))
    launch(blocks, out)
    return out
