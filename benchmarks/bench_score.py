"""End-to-end batch scoring from disk vs the in-memory solve of the same rows (rows/s).

``fma_fast.score`` reads ``.npy`` shards a chunk at a time (a reader thread one chunk ahead,
one handle per shard, a sha256 of every part's bytes and the file's identity checked after
each part), solves, and writes top-k parts with their records; the baseline is
``fma_fast.solve`` on the same rows already in memory, top-k only. A third variant scores from
disk with the digest and the identity checks switched off, which prices them. Every round runs
the three, interleaved, so host drift hits them alike; the figures are medians over the rounds
(target: disk >= 90% of memory). The rerun of a finished job (every part's bytes hashed again
and compared with its record, nothing solved) is timed once per round too.

    python -m pytest benchmarks/bench_score.py -k quick -s     # seconds
    python benchmarks/run.py benchmarks/bench_score.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import fma_fast
from fma_fast.io import row_sources

STEPS, ROUNDS, SHARDS, TOPK = 10, 7, 4, 5
GRIDS = {
    "full": {"dim": 512, "blocks": 2, "rows": 65536, "classes": 1000},
    "quick": {"dim": 128, "blocks": 2, "rows": 16384, "classes": 100},
}


@contextmanager
def identity_checks_off():
    """score without the part digest and the file identity checks (what they cost)."""
    update, check = row_sources.PartDigest.update, row_sources.ShardReader.check_unchanged
    row_sources.PartDigest.update = lambda self, column, data: None
    row_sources.ShardReader.check_unchanged = lambda self: None
    try:
        yield
    finally:
        row_sources.PartDigest.update, row_sources.ShardReader.check_unchanged = update, check


@pytest.fixture(scope="module", params=sorted(GRIDS))
def data(request, tmp_path_factory):
    grid = GRIDS[request.param]
    folder = tmp_path_factory.mktemp(f"score-{request.param}")
    torch.manual_seed(0)
    model = fma_fast.VelocityNet(grid["dim"], blocks=grid["blocks"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.03)
    x = torch.nn.functional.normalize(torch.randn(grid["rows"], grid["dim"]), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(grid["classes"], grid["dim"]), dim=-1)
    inputs = []
    for number, rows in enumerate(x.chunk(SHARDS)):
        inputs.append(folder / f"shard{number}.npy")
        np.save(inputs[-1], rows.numpy())
    np.save(folder / "classes.npy", z.numpy())
    return request.param, grid, model, x, z, inputs, folder


def test_disk_vs_memory_paired_rounds(benchmark, data):
    name, grid, model, x, z, inputs, folder = data
    times: dict[str, list[float]] = {"memory": [], "disk": [], "disk_unchecked": [],
                                     "resume_check": []}

    def memory() -> None:
        fma_fast.solve(x, model, STEPS, class_features=z, topk=TOPK)

    def disk() -> None:
        out = folder / "out"
        shutil.rmtree(out, ignore_errors=True)
        summary = fma_fast.score(model, inputs, folder / "classes.npy", out, steps=STEPS,
                                 topk=TOPK, progress=False)
        assert summary.rows_scored == x.shape[0]

    def disk_unchecked() -> None:
        with identity_checks_off():
            disk()

    def resume_check() -> None:  # after disk(): every part verified, none solved
        summary = fma_fast.score(model, inputs, folder / "classes.npy", folder / "out",
                                 steps=STEPS, topk=TOPK, progress=False)
        assert summary.rows_scored == 0

    memory()  # warm-up: plan folding, first-touch allocations
    disk()

    def one_round() -> None:
        for path, run in (("memory", memory), ("disk", disk), ("resume_check", resume_check),
                          ("disk_unchecked", disk_unchecked)):
            start = time.perf_counter()
            run()
            times[path].append(time.perf_counter() - start)

    load_before = os.getloadavg()[0]
    benchmark.group = (f"batch scoring, paired rounds ({name}: N={x.shape[0]}, D={grid['dim']}, "
                       f"{grid['blocks']} blocks, M={STEPS}, C={grid['classes']}, top-{TOPK})")
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    rates = {path: x.shape[0] / statistics.median(seconds) for path, seconds in times.items()}
    benchmark.extra_info.update(
        unit="rows/s", throughput=round(rates["disk"], 1),
        memory_rows_per_s=round(rates["memory"], 1), disk_rows_per_s=round(rates["disk"], 1),
        disk_unchecked_rows_per_s=round(rates["disk_unchecked"], 1),
        resume_check_rows_per_s=round(rates["resume_check"], 1),
        disk_vs_memory=round(rates["disk"] / rates["memory"], 3),
        disk_vs_unchecked=round(rates["disk"] / rates["disk_unchecked"], 3),
        rounds=ROUNDS, statistic="median", threads=torch.get_num_threads(),
        load_before=load_before, load_after=os.getloadavg()[0],
    )
    print(f"\n{name}: {benchmark.extra_info}")
