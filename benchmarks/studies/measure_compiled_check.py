"""What the compiled path's self-check costs: seconds per step against the step's compile.

``compiled.compiled_steps`` compiles each step and then compares it with its eager step on
a probe batch of the compiled shape. This times both for a D=512, 12-block plan of random
weights: first the compile and check of every step together, then the check alone on the same,
already compiled steps (its probe through the compiled and the eager step, and the compare).

    python benchmarks/studies/measure_compiled_check.py --steps 2 --rows 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fma_fast import VelocityNet
from fma_fast.core.environment import cpu_isa
from fma_fast.solver import compiled
from fma_fast.solver.plan import solver_plan

DIM, BLOCKS = 512, 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="M (each step compiles)")
    parser.add_argument("--rows", type=int, default=1024, help="chunk rows compiled for")
    parser.add_argument("--repeats", type=int, default=5, help="timed checks per step")
    args = parser.parse_args()
    net = VelocityNet(DIM, blocks=BLOCKS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    plan = solver_plan(net, args.steps, 0.1, dtype=torch.bfloat16)
    load = os.getloadavg()
    start = time.perf_counter()
    compiled.compiled_steps(plan, args.rows)
    compile_and_check = time.perf_counter() - start
    steps = compiled._full_plan_steps(plan)
    checks = []
    for i, step in enumerate(steps[:args.steps]):
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled._compile_and_check(i, step, args.rows, DIM)
            checks.append(time.perf_counter() - start)
    check = statistics.median(checks)
    per_step = compile_and_check / args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA "
          f"{cpu_isa()}, load average {load} -> {os.getloadavg()}")
    print(f"D={DIM}, {BLOCKS} blocks, M={args.steps}, {args.rows} chunk rows")
    print(f"compile and check, all steps: {compile_and_check:.1f} s ({per_step:.1f} s per step)")
    print(f"check alone: median {check:.3f} s per step (min {min(checks):.3f}, max "
          f"{max(checks):.3f}), {check / per_step:.2%} of a step's compile and check")


if __name__ == "__main__":
    main()
