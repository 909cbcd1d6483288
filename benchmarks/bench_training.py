"""Training-step throughput (steps/s): the released step's structure vs the step ``fit`` runs.

One step = pair, forward, loss, backward, optimizer step (no data loading, no lr schedule:
both identical in the two paths) on a batch of 32 (the released default) or 256 rows.

- released-step: noise drawn into a tensor, x̂_t and the target built by ``reference``, the
  plain loss, and torch's default AdamW (a per-tensor loop on the CPU, foreach on CUDA).
- fma_fast-step: what ``fit`` runs: pair and loss through ``dispatch`` (fused Triton kernels on
  CUDA that regenerate the noise from a seed instead of storing it; on the CPU the same
  PyTorch ops as the released step, as ``fit`` does) and fused AdamW.

On CUDA both use fp16 autocast with a GradScaler, as released, and every timed step ends with
``torch.cuda.synchronize()``. On the CPU the only difference between the first two paths is
the optimizer; fma_fast-step-bf16 is ``fit(amp="bf16")``'s step (bf16 autocast, CUDA or a CPU
with BF16 units).
Grids: "full" is D=512 with 12 blocks (the released default), "quick" D=256 with 4 blocks.

    python benchmarks/run.py -k training     # or: python -m pytest benchmarks/bench_training.py
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fma_fast
from fma_fast import reference
from fma_fast.ops import dispatch
from fma_fast.solver import routing

GRIDS = {"full": (512, 12), "quick": (256, 4)}  # (D, blocks)
BATCHES = (32, 256)
PATHS = ("released-step", "fma_fast-step", "fma_fast-step-bf16")
CLASSES, GAMMA = 100, 0.05
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS, ITERATIONS, WARMUP_STEPS = 5, 2, 2


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _training_step(dim: int, blocks: int, batch: int, path: str) -> Callable[[], None]:
    """A closure running one full training step of ``path`` on a fixed synthetic batch."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    torch.manual_seed(0)
    model = fma_fast.VelocityNet(dim, blocks).to(DEVICE).train()
    x0 = torch.nn.functional.normalize(
        torch.randn(batch, dim, device=DEVICE, generator=generator), dim=-1
    )
    table = torch.nn.functional.normalize(
        torch.randn(CLASSES, dim, device=DEVICE, generator=generator), dim=-1
    )
    labels = torch.randint(CLASSES, (batch,), device=DEVICE, generator=generator)
    fused = path.startswith("fma_fast-step")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=2e-4, weight_decay=0.01, fused=True if fused else None
    )
    # fp16 on CUDA as released; the -bf16 path is fit(amp="bf16") (CPUs with BF16 units too)
    dtype = torch.bfloat16 if path.endswith("-bf16") else torch.float16
    autocast = DEVICE.type == "cuda" or dtype == torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=DEVICE.type == "cuda" and dtype == torch.float16)
    op_backend = "auto" if DEVICE.type == "cuda" else "reference"  # as fit picks it
    seeds = iter(range(1, 1 << 30))  # fit draws a fresh noise seed per step

    def step() -> None:
        t = torch.rand(batch, device=DEVICE, generator=generator)
        if fused:
            seed = next(seeds)
            pair = dispatch.fused_pair(x0, labels, table, t, seed=seed, gamma=GAMMA,
                                       backend=op_backend, labels_checked=True)  # as fit
            x_t, t_in = pair.x_t, pair.t
        else:
            noise = torch.randn(x0.shape, device=DEVICE, generator=generator)
            x_t, target = reference.training_pair(x0, table[labels], t, noise, gamma=GAMMA)
            t_in = reference.clamp_time(t)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast):
            prediction = model(x_t, t_in)
        if fused:
            loss = dispatch.fused_loss(prediction, x0, labels, table, t, seed=seed, gamma=GAMMA,
                                       backend=op_backend, labels_checked=True).loss
        else:
            loss = reference.flow_matching_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _synchronize()

    return step


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_training_step(benchmark, grid: str, batch: int, path: str) -> None:
    dim, blocks = GRIDS[grid]
    if path.endswith("-bf16") and DEVICE.type == "cpu" and not routing.cpu_bf16_units():
        pytest.skip("this CPU has no BF16 units")
    step = _training_step(dim, blocks, batch, path)
    for _ in range(WARMUP_STEPS):
        step()  # kernel compilation, allocator, optimizer state
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = (
        f"training step ({grid}): batch {batch}, D={dim}, {blocks} blocks, {DEVICE.type}"
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=ITERATIONS)
    benchmark.extra_info.update(
        unit="steps/s",
        throughput=round(1.0 / benchmark.stats.stats.median, 2),
        baseline=path == "released-step",
        threads=torch.get_num_threads(),
    )
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()
