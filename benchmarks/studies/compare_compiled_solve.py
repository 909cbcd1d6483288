"""Does a ``torch.compile``d bf16 CPU solve pay? Eager folded bf16 against two compiled variants.

Every variant runs the same folded plan through the CPU runtime's own chunk scheduler (row
chunks, one single-threaded worker per core), interleaved round by round in one process with
the released loop and the GEMM-only chain (``gemm_chain.py``), so host drift hits all alike:

- ``eager-bf16``: ``folded_solve(precision="bf16")``, what ``solve`` runs.
- ``compiled``: ``folded_solve(precision="bf16", compiled=True)``, what
  ``solve(backend="compiled")`` runs: one frozen, max-autotuned module per step
  (``fma_fast.solver.compiled`` says which inductor settings and why). M graphs.
- ``compiled-elementwise``: the eager chain's GEMMs (``cpu_ops.linear``, bias in the
  epilogue) and SiLU, with one compiled kernel in place of its three passes per block
  (residual add, LayerNorm statistics, scale-and-cast). The weights are inputs, so one graph
  serves every step and block, and inductor's on-disk cache applies.

Compile time is reported cold (fresh cache directory) and warm (second process, same cache).

    python benchmarks/studies/compare_compiled_solve.py --rows 16384 --rounds 3    # cold
    python benchmarks/studies/compare_compiled_solve.py --rows 16384 --rounds 3 \
        --cache-dir D                                                              # warm

The compiled-elementwise variant is a prototype kept here with its measurement; it is not in
the library (it was slower than eager with the row workers).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: baselines, benches

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from baselines.gemm_chain import gemm_only_solve
from baselines.released_loop import released_solve

import fma_fast
from fma_fast.solver.cpu import (
    _advance,
    _Buffers,
    _prepare,
    _single_threaded_ops,
    folded_solve,
)
from fma_fast.solver.cpu_ops import linear as fused_linear
from fma_fast.solver.plan import SolverPlan, solver_plan

STEPS, STEP_SIZE, DIM, BLOCKS, CLASSES = 10, 0.1, 512, 12, 1000
VARIANTS = ("compiled", "compiled-elementwise")


def _field(seed: int = 0) -> fma_fast.VelocityNet:
    """A D=512, 12-block field with every weight perturbed (an untrained one outputs zero)."""
    torch.manual_seed(seed)
    model = fma_fast.VelocityNet(DIM, BLOCKS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.03 * torch.randn_like(parameter))
    return model


def _elementwise_kernels(eps: float):
    def normed(hidden):
        scale = torch.rsqrt(hidden.square().mean(1, keepdim=True) + eps)
        return (hidden * scale).to(torch.bfloat16)

    def residual_then_normed(hidden, update):
        hidden.add_(update)
        return normed(hidden)

    compile_options = {"dynamic": True, "fullgraph": True}
    return torch.compile(normed, **compile_options), torch.compile(residual_then_normed,
                                                                   **compile_options)


def _compiled_elementwise_solve(plan: SolverPlan, kernels, x: torch.Tensor) -> torch.Tensor:
    normed, residual_then_normed = kernels
    plan, state, chunk, workers = _prepare(plan, x, plan.steps, plan.step_size, "bf16", None,
                                           None, True)

    def step(plan, i, rows, buffers: _Buffers):
        n = rows.shape[0]
        hidden = buffers.hidden[:n]
        features = buffers.features[:n].copy_(rows)
        hidden.copy_(fused_linear(features, buffers.input_weight, buffers.input_bias))
        operand = normed(hidden)
        for b in range(plan.blocks):
            inner = F.silu(fused_linear(operand, plan.w1[i, b], plan.b1[i, b]), inplace=True)
            update = fused_linear(inner, plan.w2[i, b], plan.b2[i, b])
            operand = residual_then_normed(hidden, update)
        rows.add_(fused_linear(operand, plan.wf[i], plan.bf[i]))

    for _ in _advance(plan, state.shape[0], chunk, workers, step, state):
        pass
    return state


def _warm_elementwise(kernels, rows: int) -> None:
    hidden = torch.randn(rows, DIM)
    with _single_threaded_ops(), torch.no_grad():
        kernels[0](hidden)
        kernels[1](hidden, hidden.to(torch.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--released-rows", type=int, default=4096,
                        help="rows the released loop is timed on (its rate barely depends on N)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache-dir", default=None,
                        help="inductor cache directory (default: a fresh one, i.e. cold)")
    args = parser.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="fma-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    variants = [v for v in args.variants.split(",") if v]
    model = _field()
    plan = solver_plan(model, STEPS, STEP_SIZE, dtype=torch.bfloat16)
    x = F.normalize(torch.randn(args.rows, DIM, generator=torch.Generator().manual_seed(1)),
                    dim=-1)
    classes = F.normalize(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(2)),
                          dim=-1)
    released_x = x[: args.released_rows]
    solvers = {
        "released": (lambda: released_solve(model, released_x, STEPS, STEP_SIZE), released_x),
        "eager-fp32": (lambda: folded_solve(model, x, STEPS, STEP_SIZE), x),
        "eager-bf16": (lambda: folded_solve(model, x, STEPS, STEP_SIZE, precision="bf16"), x),
        "gemm-only-bf16": (
            lambda: gemm_only_solve(model, x, STEPS, STEP_SIZE, precision="bf16"), x),
    }
    compile_s = {}
    chunk = x[:1024].clone()  # compiling the runtime's chunk shape
    if "compiled" in variants:
        start = time.perf_counter()
        folded_solve(model, chunk, STEPS, STEP_SIZE, precision="bf16", compiled=True)
        compile_s["compiled"] = time.perf_counter() - start
        solvers["compiled"] = (
            lambda: folded_solve(model, x, STEPS, STEP_SIZE, precision="bf16", compiled=True), x)
    if "compiled-elementwise" in variants:
        start = time.perf_counter()
        kernels = _elementwise_kernels(plan.eps)
        _warm_elementwise(kernels, 1024)
        compile_s["compiled-elementwise"] = time.perf_counter() - start
        solvers["compiled-elementwise"] = (
            lambda: _compiled_elementwise_solve(plan, kernels, x), x)
    with torch.no_grad():
        fp32 = folded_solve(model, x, STEPS, STEP_SIZE)
        wanted = (fp32 @ classes.T).argmax(1)
        agreement, max_diff = {}, {}
        for name in solvers:
            if name.startswith(("eager-bf16", "compiled")):
                state = solvers[name][0]()
                agreement[name] = float(((state @ classes.T).argmax(1) == wanted).float().mean())
                max_diff[name] = float((state - fp32).abs().max())
        best = dict.fromkeys(solvers, float("inf"))
        for _ in range(args.rounds):
            for name, (solve, _) in solvers.items():
                start = time.perf_counter()
                solve()
                best[name] = min(best[name], time.perf_counter() - start)
    rates = {name: solvers[name][1].shape[0] / seconds for name, seconds in best.items()}
    print(f"rows={args.rows}, D={DIM}, {BLOCKS} blocks, M={STEPS}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, 1-min load "
          f"{os.getloadavg()[0]:.2f}, inductor cache {cache}")
    print("| path | rows/s (best of rounds) | vs released | vs eager bf16 | compile s "
          "| top-1 = fp32 (1,000 random classes) | max abs diff to fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rate in rates.items():
        extra = (f"{compile_s[name]:.1f}" if name in compile_s else "",
                 f"{agreement[name]:.2%}" if name in agreement else "",
                 f"{max_diff[name]:.4f}" if name in max_diff else "")
        print(f"| {name} | {rate:,.0f} | {rate / rates['released']:.2f}x | "
              f"{rate / rates['eager-bf16']:.2f}x | {' | '.join(extra)} |")


if __name__ == "__main__":
    main()
