"""Fused explicit Euler step: x ← x + h·v and t ← t + h in one launch.

The time lives in a device scalar so a solver loop never syncs with the host; program 0 also
advances it. Math is fp32 whatever the dtypes of x and v (a half-precision network output may
update an fp32 state). Bandwidth-bound: one read of x and v, one write; untuned block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_tensor_device, pick_blocks


@triton.jit
def _euler_kernel(x_ptr, v_ptr, out_ptr, t_ptr, t_out_ptr, numel, h, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + h * v).to(out_ptr.dtype.element_ty), mask=mask)
    if pid == 0:
        tl.store(t_out_ptr, tl.load(t_ptr).to(tl.float32) + h)


@on_tensor_device
def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, step_size: float,
               out: torch.Tensor | None = None, t_out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x + h·v into ``out`` (x itself for in place) and t + h into ``t_out`` (t for in place);
    fresh tensors when ``out`` / ``t_out`` are None. ``t`` is a one-element fp32 tensor."""
    if x.shape != v.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but the velocity {tuple(v.shape)}")
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"t must be a one-element float32 tensor, got {t.dtype} {tuple(t.shape)}")
    v, src = v.contiguous(), x.contiguous()
    if out is None:
        out = torch.empty_like(src)
    elif not out.is_contiguous() or out.shape != x.shape:
        raise ValueError("out must be a contiguous tensor of x's shape")
    if t_out is None:
        t_out = torch.empty_like(t)
    numel = src.numel()
    b = pick_blocks("euler", numel, 1)
    _euler_kernel[(max(1, triton.cdiv(numel, b.block_n)),)](
        src, v, out, t, t_out, numel, float(step_size), BLOCK=b.block_n, num_warps=b.num_warps,
    )
    return out, t_out
