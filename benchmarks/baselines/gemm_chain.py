"""Baseline: the folded CPU runtime's GEMMs alone, as the speed ceiling of its torch chain.

Same plan weights, same GEMM shapes and dtypes, same row chunks and worker threads as
``fma_fast.solver.cpu`` (it runs through the runtime's own chunk scheduler), and nothing
else: no LayerNorm statistics, SiLU, bias or residual passes, no casts. Its operands are fixed
random rows, so the values stay bounded (no denormals) whatever the weights do. The fp32 plan
runs the final-state path's GEMMs (25 per step), bf16 the states path's (26 per step), as
``folded_solve`` does. ``tests/test_benchmarks_harness.py`` checks that the shapes match.
"""

from __future__ import annotations

import torch

from fma_fast import VelocityNet
from fma_fast.solver.cpu import _advance, _Buffers, _prepare
from fma_fast.solver.plan import SolverPlan


class _Operands:
    """Fixed bounded GEMM inputs and an output per (dtype, columns) of one worker."""

    def __init__(self, buffers: _Buffers, plan: SolverPlan):
        rows = buffers.hidden.shape[0]
        generator = torch.Generator().manual_seed(0)

        def rows_of(cols: int, dtype: torch.dtype) -> torch.Tensor:
            values = torch.randn(rows, cols, generator=generator) / cols**0.5
            return values.to(dtype)

        low = plan.dtype
        self.inputs = {plan.dim: rows_of(plan.dim, low), plan.width: rows_of(plan.width, low)}
        self.outputs = {plan.dim: torch.empty(rows, plan.dim, dtype=low),
                        plan.width: torch.empty(rows, plan.width, dtype=low)}
        self.input_weight = plan.input_weight.to(low)


def _operands(buffers: _Buffers, plan: SolverPlan) -> _Operands:
    if not hasattr(buffers, "gemm_operands"):
        buffers.gemm_operands = _Operands(buffers, plan)
    return buffers.gemm_operands


def _mm(operands: _Operands, rows: int, weight: torch.Tensor) -> None:
    torch.mm(operands.inputs[weight.shape[0]][:rows], weight,
             out=operands.outputs[weight.shape[1]][:rows])


def _final_path_gemms(plan: SolverPlan, i: int, x: torch.Tensor, buffers: _Buffers) -> None:
    operands, rows = _operands(buffers, plan), x.shape[0]
    if i == 0:
        _mm(operands, rows, plan.input_weight)
    for b in range(plan.blocks):
        _mm(operands, rows, plan.w1[i, b])
        _mm(operands, rows, plan.w2[i, b])
    if i + 1 < plan.steps:
        _mm(operands, rows, plan.feedback[i])
    else:
        _mm(operands, rows, plan.final_weight)


def _states_path_gemms(plan: SolverPlan, i: int, x: torch.Tensor, buffers: _Buffers) -> None:
    operands, rows = _operands(buffers, plan), x.shape[0]
    _mm(operands, rows, operands.input_weight)
    for b in range(plan.blocks):
        _mm(operands, rows, plan.w1[i, b])
        _mm(operands, rows, plan.w2[i, b])
    _mm(operands, rows, plan.wf[i])


@torch.no_grad()
def gemm_only_solve(
    model: VelocityNet | SolverPlan, x: torch.Tensor, steps: int, step_size: float = 0.1,
    *, precision: str = "fp32", chunk_rows: int | None = None, workers: int | None = None,
) -> None:
    """Run the GEMMs ``folded_solve(model, x, steps, step_size, precision=precision)`` runs,
    on the same chunks and workers, and nothing else (returns nothing: the values are not a
    solve)."""
    plan, state, chunk, workers = _prepare(model, x, steps, step_size, precision, chunk_rows,
                                           workers, precision != "fp32")
    step = _final_path_gemms if plan.final_only else _states_path_gemms
    for _ in _advance(plan, state.shape[0], chunk, workers, step, state):
        pass
