"""Where the CPU training step could go: eager fp32/bf16 against torch.compile'd and pure-bf16
steps, interleaved in one process with the released step (``bench_training``'s baseline).

Each step: forward, mean-squared loss, backward, fused AdamW on a fixed batch (D=512, 12
blocks). The compiled steps compile the forward (and with it AOTAutograd's backward);
"pure-bf16" holds the weights in bf16 (no casts at all, bf16 optimizer states: an upper bound
for any mixed-precision scheme, not a training recipe). None of these is in ``fit``; the
numbers are in benchmarks/results/notes/cpu-speed.md.

    python benchmarks/studies/compare_training_step.py --batch 32 --rounds 7
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: baselines, benches

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from bench_training import _training_step

import fma_fast

DIM, BLOCKS = 512, 12


def _step(batch: int, *, compiled: bool, amp: bool, pure_bf16: bool = False) -> Callable:
    torch.manual_seed(0)
    model = fma_fast.VelocityNet(DIM, BLOCKS).train()
    if pure_bf16:
        model = model.bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01, fused=True)
    x, t = torch.randn(batch, DIM), torch.rand(batch)
    target = torch.randn(batch, DIM)

    def loss_of(x, t, target):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            prediction = model(x.to(torch.bfloat16) if pure_bf16 else x, t)
        return (prediction.float() - target).square().mean()

    loss_fn = torch.compile(loss_of, dynamic=False) if compiled else loss_of

    def step() -> None:
        loss = loss_fn(x, t, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    steps, compile_s = {}, {}
    variants = {"eager-fp32": {"compiled": False, "amp": False},
                "eager-bf16-autocast": {"compiled": False, "amp": True},
                "compiled-fp32": {"compiled": True, "amp": False},
                "compiled-bf16-autocast": {"compiled": True, "amp": True},
                "pure-bf16 (bound)": {"compiled": False, "amp": False, "pure_bf16": True}}
    steps["released"] = _training_step(DIM, BLOCKS, args.batch, "released-step")
    for name, options in variants.items():
        steps[name] = _step(args.batch, **options)
        start = time.perf_counter()
        steps[name]()  # compiles the compiled ones
        compile_s[name] = time.perf_counter() - start
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"batch {args.batch}, D={DIM}, {BLOCKS} blocks, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, 1-min load {os.getloadavg()[0]:.2f}, median of "
          f"{args.rounds} interleaved rounds")
    print("| step | ms/step | vs released | first call s (compile) |\n|---|---:|---:|---:|")
    for name, seconds in median.items():
        first = f"{compile_s[name]:.1f}" if name in compile_s else ""
        print(f"| {name} | {seconds * 1e3:.1f} | {median['released'] / seconds:.2f}x | {first} |")


if __name__ == "__main__":
    main()
