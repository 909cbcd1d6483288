"""The Triton runtime of the folded plan (docs/method.md §3): the fused step kernels.

Per step: one input-projection GEMM (cuBLAS, fp32 in and out), then one fused kernel per
residual block (LayerNorm statistics, GEMM, SiLU, GEMM, residual; the hidden activations stay
on chip) and one fused kernel for the final layer with the Euler update. That is 2 + blocks
launches per step instead of about a hundred for the unfolded network. The same two entry
points as the torch runtime: :func:`fused_states` and :func:`fused_final`.

Runs wherever the Triton kernels run: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from ..kernels._common import DEFAULT_DOT_PRECISION, with_fallback
from .plan import SolverPlan

_RUNS: set[tuple] = set()
PROBE_ROWS = 3
"""Rows of :func:`kernels_run`'s probe (any count compiles the variants a solve runs)."""


def _run_step(
    plan: SolverPlan, i: int, state: torch.Tensor, hidden: torch.Tensor, dot_precision: str
) -> None:
    from ..kernels.folded_step import final_euler_update, residual_block

    torch.addmm(plan.input_bias, state, plan.input_weight, out=hidden)
    for b in range(plan.blocks):
        # The plan stores (in, out) matrices; the kernels take (out, in) with any strides.
        residual_block(
            hidden,
            plan.w1[i, b].T,
            plan.b1[i, b],
            plan.w2[i, b].T,
            plan.b2[i, b],
            eps=plan.eps,
            out=hidden,
            precision=dot_precision,
        )
    final_euler_update(
        hidden, state, plan.wf[i].T, plan.bf[i], eps=plan.eps, out=state, precision=dot_precision
    )


def _specialisation(plan: SolverPlan, dot_precision: str) -> tuple:
    """What decides which kernel variants a solve of ``plan`` compiles, besides the row count
    (which the kernels do not specialise on): device, dtypes, shapes, the dot precision and the
    16-byte alignment of every step's weight views (the state and hidden buffers are fresh
    allocations, always aligned)."""
    views = [t for i in range(plan.steps) for t in (
        *(w[i, b] for w in (plan.w1, plan.b1, plan.w2, plan.b2) for b in range(plan.blocks)),
        plan.wf[i], plan.bf[i])]
    return (str(plan.device), plan.dtype, plan.width, plan.dim, plan.blocks, dot_precision,
            tuple(t.data_ptr() % 16 == 0 for t in views))


def kernels_run(plan: SolverPlan, *, dot_precision: str = DEFAULT_DOT_PRECISION) -> bool:
    """Whether the fused step kernels build and launch here for this plan: every step once on
    a few rows, so every kernel variant the solve runs is compiled and launched here (the
    variants depend on the weights' dtypes, shapes and alignment, not on the row count). A
    failure is recorded and warned about once (op "folded_step"); the solve then takes the
    torch GEMM chain."""
    key = _specialisation(plan, dot_precision)
    if plan.steps == 0 or key in _RUNS:
        return True
    state = torch.zeros(PROBE_ROWS, plan.dim, dtype=torch.float32, device=plan.device)
    hidden = torch.empty(PROBE_ROWS, plan.width, dtype=torch.float32, device=plan.device)

    def probe() -> None:
        for i in range(plan.steps):
            _run_step(plan, i, state, hidden, dot_precision)

    _, fell_back = with_fallback("folded_step", plan.wf[0], probe, lambda: None)
    if not fell_back:
        _RUNS.add(key)
    return not fell_back


def fused_states(
    plan: SolverPlan, x: torch.Tensor, *, dot_precision: str = DEFAULT_DOT_PRECISION
) -> Iterator[torch.Tensor]:
    """Yield the fp32 states x_0..x_M; every yield is the same buffer, updated in place."""
    state = x.to(torch.float32, copy=True).contiguous()
    hidden = torch.empty(state.shape[0], plan.width, dtype=torch.float32, device=state.device)
    yield state
    for i in range(plan.steps):
        _run_step(plan, i, state, hidden, dot_precision)
        yield state


def fused_final(
    plan: SolverPlan, x: torch.Tensor, *, dot_precision: str = DEFAULT_DOT_PRECISION
) -> torch.Tensor:
    """The fp32 final state x_M of :func:`fused_states` (a fresh tensor)."""
    return deque(fused_states(plan, x, dot_precision=dot_precision), maxlen=1)[0]
