"""bf16 against fp32 on this CPU: rows/s of the folded CPU chain, 1 and 2 threads, interleaved.

Does bf16 pay on this CPU, and does the rule in ``fma_fast.solver.routing`` (bf16 only where
oneDNN has BF16 units in effect) match what runs? The runtime is called directly
(``folded_solve``), so bf16 is timed even where ``solve`` refuses it. Run it once per ISA
mask, each in its own process (the mask is read at start-up):

    python benchmarks/studies/compare_cpu_precisions.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python benchmarks/studies/compare_cpu_precisions.py

D=512, 12 blocks, M=10, random weights. Each (precision, threads) runs ``--rounds`` rounds,
interleaved with the others; a configuration gets as many rows (at most ``--rows``) as fit
``--seconds`` per round after a short calibration run, so a 30x slower path still finishes.
Prints one markdown table (median rows/s) and the machine, ISA and load lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fma_fast import VelocityNet
from fma_fast.core.environment import ISA_MASKS, aten_isa, cpu_name
from fma_fast.solver import routing
from fma_fast.solver.cpu import folded_solve

STEPS, DIM, BLOCKS = 10, 512, 12


def _net(seed: int = 0) -> VelocityNet:
    net = VelocityNet(DIM, blocks=BLOCKS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


def _run(net: VelocityNet, x: torch.Tensor, precision: str, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    folded_solve(net, x, STEPS, 0.1, precision=precision, workers=threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="most rows per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="target seconds per round")
    args = parser.parse_args()
    net = _net()
    features = F.normalize(torch.randn(args.rows, DIM, generator=torch.Generator()
                                       .manual_seed(1)), dim=-1)
    configs = [(precision, threads) for threads in (1, 2) for precision in ("fp32", "bf16")]
    rows = {}
    load_start = os.getloadavg()
    for precision, threads in configs:  # calibrate (the first run builds the plan)
        _run(net, features[:32], precision, threads)
        seconds = _run(net, features[:64], precision, threads)
        rows[precision, threads] = max(64, min(args.rows, int(64 * args.seconds / seconds)))
    rates: dict[tuple[str, int], list[float]] = {config: [] for config in configs}
    for _ in range(args.rounds):
        for config in configs:
            n = rows[config]
            rates[config].append(n / _run(net, features[:n], *config))
    load_end = os.getloadavg()
    mask = {name: os.environ.get(name, "(unset)") for name in ISA_MASKS}
    print(f"machine: {cpu_name()}, "
          f"{os.cpu_count()} logical CPUs; torch {torch.__version__}")
    print(f"ISA in effect: ATen {aten_isa()}, BF16 units in "
          f"effect (routing.cpu_bf16_units): {routing.cpu_bf16_units()}; mask: {mask}")
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}")
    print(f"D={DIM}, {BLOCKS} blocks, M={STEPS}, {args.rounds} interleaved rounds, median\n")
    print("| precision | threads | rows per round | rows/s (median) | all rounds | bf16 / fp32 |")
    print("|---|---:|---:|---:|---|---:|")
    for precision, threads in configs:
        median = statistics.median(rates[precision, threads])
        ratio = median / statistics.median(rates["fp32", threads])
        print(f"| {precision} | {threads} | {rows[precision, threads]} | {median:,.1f} | "
              + ", ".join(f"{rate:.1f}" for rate in rates[precision, threads])
              + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
