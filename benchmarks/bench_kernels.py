"""Micro-benchmarks of each Triton op against its eager reference and torch.compile of it.

NOT RUN YET: written in a session without a GPU; no number here has been measured. CUDA only:
on the CPU the kernels run in Triton's numpy interpreter, a correctness tool whose timings mean
nothing, so the file skips there.

Paths per op: reference (baseline: the eager ``fma_fast.core.reference`` op, or ``dispatch`` with
backend="reference"), compiled (``torch.compile`` of that same callable, default mode; its
compile time is compile_s; full grid only, ``FMA_BENCH_COMPILE=0`` skips it), triton
(``dispatch`` with backend="triton", or the folded-step launcher) and, for the folded-step
ops, triton-bf16 (bf16 weights, as a bf16 solve runs them). Each timed round runs the op
ITERATIONS times and synchronises once after the last call (pytest-benchmark divides by the
iterations), so the times are per call with the launch queue kept full.

Ops: the fused training pair + loss (forward and backward), the Euler update, cosine top-5 at
C=1,000 and C=50,000, the released step ensemble (3 states, top-5), cosine cross-entropy
(forward and backward), a folded residual block and the folded final layer + Euler update.
Rows: 65,536 in the full grid (262,144 for the Euler update), 4,096 in the quick grid.

    python benchmarks/run.py -k kernels
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fma_fast import reference
from fma_fast.kernels._common import HAS_TRITON
from fma_fast.ops import dispatch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="kernel timings need CUDA (the CPU interpreter is not a speed "
                              "measurement)"),
    pytest.mark.skipif(not HAS_TRITON, reason="kernel timings need triton"),
]

DIM, CLASSES, TOPK, GAMMA, SEED, STEP_SIZE, LOGIT_SCALE = 512, 1_000, 5, 0.05, 7, 0.1, 100.0
GRIDS = {"full": 65_536, "quick": 4_096}
EULER_ROWS_FACTOR = 4
ROUNDS, ITERATIONS = 10, 10
COMPILE = os.environ.get("FMA_BENCH_COMPILE", "1") != "0"


@dataclass
class Op:
    """One op: the eager baseline (also what torch.compile gets), the Triton calls, their
    arguments, and tensors whose .grad a forward+backward op resets before each call."""

    reference: Callable[..., Any]
    kernels: dict[str, Callable[..., Any]]
    args: tuple
    leaves: list[torch.Tensor] = field(default_factory=list)


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, device="cuda"), dim=-1)


def _pair_loss(rows: int) -> Op:
    x0, table, t = _unit(rows, DIM), _unit(CLASSES, DIM), torch.rand(rows, device="cuda")
    labels = torch.randint(CLASSES, (rows,), device="cuda")
    pred = torch.randn(rows, DIM, device="cuda", requires_grad=True)

    def eager(x0, labels, table, t, pred):
        noise = torch.randn_like(x0)
        x_t, target = reference.training_pair(x0, table[labels], t, noise, gamma=GAMMA)
        return x_t, reference.flow_matching_loss(pred, target)

    def fused(x0, labels, table, t, pred):
        options = {"seed": SEED, "gamma": GAMMA, "backend": "triton", "labels_checked": True}
        x_t = dispatch.fused_pair(x0, labels, table, t, **options).x_t
        return x_t, dispatch.fused_loss(pred, x0, labels, table, t, **options).loss

    return Op(eager, {"triton": fused}, (x0, labels, table, t, pred), [pred])


def _euler(rows: int) -> Op:
    rows *= EULER_ROWS_FACTOR
    x, v = torch.randn(rows, DIM, device="cuda"), torch.randn(rows, DIM, device="cuda")
    t = torch.zeros((), device="cuda")

    def eager(x, v, t):
        return reference.euler_step(x, v, t, STEP_SIZE)

    def fused(x, v, t):  # in place, as a solver loop runs it
        return dispatch.euler_step(x, v, t, STEP_SIZE, inplace=True, backend="triton")[:2]

    return Op(eager, {"triton": fused}, (x, v, t))


def _topk(classes: int) -> Callable[[int], Op]:
    def build(rows: int) -> Op:
        def eager(x, table):
            return reference.cosine_topk(x, table, TOPK)

        def fused(x, table):
            return dispatch.cosine_topk(x, table, TOPK, normalized=True, backend="triton")[:2]

        return Op(eager, {"triton": fused}, (torch.randn(rows, DIM, device="cuda"),
                                             _unit(classes, DIM)))

    return build


def _ensemble(rows: int) -> Op:
    def eager(states, table):
        return dispatch.step_ensemble_topk(states, table, TOPK, logit_scale=LOGIT_SCALE,
                                           backend="reference")[:2]

    def fused(states, table):
        return dispatch.step_ensemble_topk(states, table, TOPK, logit_scale=LOGIT_SCALE,
                                           normalized=True, backend="triton")[:2]

    return Op(eager, {"triton": fused}, (torch.randn(3, rows, DIM, device="cuda"),
                                         _unit(CLASSES, DIM)))


def _cross_entropy(rows: int) -> Op:
    x = torch.randn(rows, DIM, device="cuda", requires_grad=True)
    labels = torch.randint(CLASSES, (rows,), device="cuda")

    def eager(x, table, labels):
        return reference.cosine_cross_entropy(x, table, labels, LOGIT_SCALE)

    def fused(x, table, labels):
        return dispatch.cosine_cross_entropy(x, table, labels, LOGIT_SCALE, normalized=True,
                                             backend="triton", labels_checked=True).loss

    return Op(eager, {"triton": fused}, (x, _unit(CLASSES, DIM), labels), [x])


def _linear(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(out_features, in_features, device="cuda") / in_features**0.5
    return weight, 0.1 * torch.randn(out_features, device="cuda")


def _bf16(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(torch.bfloat16) for t in tensors)


def _residual_block(rows: int) -> Op:
    from fma_fast.kernels.folded_step import residual_block

    h = torch.randn(rows, DIM, device="cuda")
    weights = (*_linear(DIM, DIM), *_linear(DIM, DIM))  # w1, b1, w2, b2 (out, in)
    bf16 = _bf16(weights)
    return Op(reference.folded_residual_block,
              {"triton": residual_block,
               "triton-bf16": lambda h, *_: residual_block(h, *bf16)},
              (h, *weights))


def _final_euler(rows: int) -> Op:
    from fma_fast.kernels.folded_step import final_euler_update

    h, x = torch.randn(rows, DIM, device="cuda"), torch.randn(rows, DIM, device="cuda")
    weights = _linear(DIM, DIM)  # wf, bf, with h folded in
    bf16 = _bf16(weights)
    return Op(reference.folded_final_update,
              {"triton": final_euler_update,
               "triton-bf16": lambda h, x, *_: final_euler_update(h, x, *bf16)},
              (h, x, *weights))


OPS: dict[str, tuple[str, Callable[[int], Op], tuple[str, ...]]] = {
    "pair_loss": ("fused pair + loss, fwd+bwd", _pair_loss, ("triton",)),
    "euler": ("Euler update", _euler, ("triton",)),
    "topk_C1000": ("cosine top-5, C=1,000", _topk(1_000), ("triton",)),
    "topk_C50000": ("cosine top-5, C=50,000", _topk(50_000), ("triton",)),
    "ensemble": ("step ensemble top-5, 3 states, C=1,000", _ensemble, ("triton",)),
    "cross_entropy": ("cosine CE fwd+bwd, C=1,000", _cross_entropy, ("triton",)),
    "residual_block": ("folded residual block", _residual_block, ("triton", "triton-bf16")),
    "final_euler": ("folded final layer + Euler update", _final_euler,
                    ("triton", "triton-bf16")),
}
CASES = [(op, path) for op, (_, _, kernels) in OPS.items()
         for path in ("reference", "compiled", *kernels)]


class SyncEvery:
    """Calls ``fn``; every ``every``-th call then waits for the GPU. With pytest-benchmark's
    ``iterations=every`` a timed round is ``every`` calls and one synchronisation."""

    def __init__(self, fn: Callable[[], Any], every: int):
        self.fn, self.every, self.calls = fn, every, 0

    def __call__(self) -> None:
        self.fn()
        self.calls += 1
        if self.calls % self.every == 0:
            torch.cuda.synchronize()


def _call(fn: Callable[..., Any], op: Op) -> Callable[[], None]:
    """One forward (and backward when ``op`` has leaves) of ``fn`` on ``op``'s arguments."""

    def run() -> None:
        out = fn(*op.args)
        if op.leaves:
            for leaf in op.leaves:
                leaf.grad = None
            (out[-1] if isinstance(out, tuple) else out).backward()

    return run


@pytest.mark.parametrize("op,path", CASES, ids=[f"{op}-{path}" for op, path in CASES])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_kernel(benchmark, grid: str, op: str, path: str) -> None:
    if path == "compiled" and not COMPILE:
        pytest.skip("FMA_BENCH_COMPILE=0")
    if path == "compiled" and grid != "full":
        pytest.skip("torch.compile baselines run in the full grid only")
    title, build, _ = OPS[op]
    spec = build(GRIDS[grid])
    if path == "reference":
        fn = spec.reference
    elif path == "compiled":
        fn = torch.compile(spec.reference)
    else:
        fn = spec.kernels[path]
    run = _call(fn, spec)
    start = time.perf_counter()
    run()  # Triton JIT or inductor compile, outside the timing
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    rows = spec.args[0].shape[-2]
    benchmark.group = f"kernel ({grid}): {title}, {rows:,} rows, D={DIM}"
    benchmark.pedantic(SyncEvery(run, ITERATIONS), rounds=ROUNDS, iterations=ITERATIONS,
                       warmup_rounds=1)
    benchmark.extra_info.update(
        unit="rows/s", throughput=round(rows / benchmark.stats.stats.median),
        baseline=path == "reference",
        **{"compile_s" if path == "compiled" else "first_call_s": round(first_call, 2)},
    )
