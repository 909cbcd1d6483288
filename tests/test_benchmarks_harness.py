"""benchmarks/run.py: grouping and speed-ups, the tagged result files, and failing loudly.

The end-to-end test runs run.py on a tiny benchmark file (no torch in the child), so it checks
the real pytest-benchmark JSON and JUnit plumbing in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"

TINY_BENCH = '''
import pytest


@pytest.mark.parametrize("path", ["released", "fast"])
@pytest.mark.parametrize("grid", ["quick"])
def test_sum(benchmark, grid, path):
    n = 20_000 if path == "released" else 2_000
    benchmark.pedantic(lambda: sum(range(n)), rounds=3, iterations=2)
    benchmark.extra_info["rows_per_s"] = n / benchmark.stats.stats.median


@pytest.mark.parametrize("path", ["slow", "fast"])
def test_grouped(benchmark, path):
    benchmark.group = "grouped"
    benchmark.pedantic(lambda: sorted(range(1_000)), rounds=2)
    benchmark.extra_info.update(unit="steps/s", throughput=12.5, baseline=path == "slow",
                                peak_bytes=3 * 2**20, note="hello")


@pytest.mark.skip(reason="GPU benchmark: needs CUDA")
def test_gpu(benchmark):
    pass


def test_broken(benchmark):
    raise RuntimeError("boom")
'''


def _load_run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name: str, median: float, params: dict, extra: dict, group: str | None = None):
    stats = {"median": median, "min": median * 0.9, "mean": median, "stddev": 0.0, "rounds": 3,
             "iterations": 1}
    return {"group": group, "name": name.split("::")[1], "fullname": name, "params": params,
            "extra_info": extra, "stats": stats}


def test_cpu_solver_format_groups_by_grid_with_released_baseline():
    """bench_cpu_solver records rows_per_s, no group, and a "released" path per grid."""
    run = _load_run_module()
    test = "benchmarks/bench_cpu_solver.py::test_throughput"
    raw = {"benchmarks": [
        _bench(f"{test}[full-released]", 4.0, {"trained": "full", "path": "released"},
               {"rows_per_s": 1024.0}),
        _bench(f"{test}[full-folded-bf16]", 1.0, {"trained": "full", "path": "folded-bf16"},
               {"rows_per_s": 4096.0, "plan_build_s": 0.2}),
        _bench(f"{test}[quick-folded-fp32]", 0.5, {"trained": "quick", "path": "folded-fp32"},
               {"rows_per_s": 2048.0}),
    ]}
    report = run.build_report(raw, {"status": "ok"})
    groups = {g["name"]: g for g in report["groups"]}
    assert set(groups) == {"bench_cpu_solver.test_throughput [trained=full]",
                           "bench_cpu_solver.test_throughput [trained=quick]"}
    full = groups["bench_cpu_solver.test_throughput [trained=full]"]
    assert full["baseline"] == "released"
    released, bf16 = full["benchmarks"]
    assert (released["label"], released["speedup"]) == ("released", 1.0)
    assert (bf16["speedup"], bf16["throughput"], bf16["unit"]) == (4.0, 4096.0, "rows/s")
    quick = groups["bench_cpu_solver.test_throughput [trained=quick]"]
    assert quick["baseline"] is None and quick["benchmarks"][0]["speedup"] is None


def test_run_writes_tagged_results_and_fails_loudly(tmp_path):
    """One run.py call: files named from the device and -k, tagged, grouped; the erroring
    benchmark makes the run exit 1, say so, and mark both files FAILED."""
    bench = tmp_path / "bench_tiny.py"
    bench.write_text(textwrap.dedent(TINY_BENCH))
    done = subprocess.run([sys.executable, str(RUN_PY), str(bench), "--out",
                           str(tmp_path / "results"), "-k", "sum or grouped or gpu or broken"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "benchmarks FAILED" in done.stderr and "test_broken" in done.stderr
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(written) == 2 and written[0].endswith("-k-sum-or-grouped-or-gpu-or-broken.json")
    report = json.loads((tmp_path / "results" / written[0]).read_text())
    assert report["status"] == "failed" and report["device"]["slug"] in written[0]
    assert {"python", "torch", "triton", "fma_fast"} <= set(report["versions"])
    assert len(report["date_utc"]) == 19 and report["git"]["commit"]
    assert isinstance(report["git"]["dirty"], bool)
    assert report["loadavg_1min"]["before"] >= 0 and report["wall_s"] > 0
    outcome = report["outcome"]
    assert (outcome["passed"], outcome["failed"], outcome["skipped"]) == (4, 1, 1)
    groups = {g["name"]: g for g in report["groups"]}
    released, fast = groups["bench_tiny.test_sum [grid=quick]"]["benchmarks"]
    assert released["baseline"] and released["unit"] == "rows/s"
    assert fast["speedup"] == pytest.approx(released["median_s"] / fast["median_s"])
    slow, other = groups["grouped"]["benchmarks"]
    assert slow["label"] == "slow" and other["throughput"] == 12.5
    markdown = (tmp_path / "results" / written[1]).read_text()
    for text in ("# Benchmarks: ", "**FAILED: 1 benchmark", "commit: `", "versions: python",
                 "date (UTC)", "load average", "| slow (baseline) |", "12.5 steps/s",
                 "3.0 MiB", "note=hello", "GPU benchmark: needs CUDA (1 test)"):
        assert text in markdown, text


def _load_benchmark_module(name: str):
    path = RUN_PY.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorded_gemms(run) -> list[tuple]:
    """(rows, inner, cols, dtype) of every matrix product ``run()`` dispatches, in order
    (``mm``, ``addmm`` and oneDNN's linear, which the bf16 chain runs)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default: 0, torch.ops.aten.mm.out: 0,
                torch.ops.aten.addmm.default: 1, torch.ops.aten.addmm.out: 1,
                torch.ops.aten.addmm_.default: 1}
    seen: list[tuple] = []

    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # weight given (out, in)
    linear = None if linear is None else linear.default

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                a, b = args[products[func]], args[products[func] + 1]
                seen.append((a.shape[0], a.shape[1], b.shape[1], b.dtype))
            elif func == linear:
                seen.append((args[0].shape[0], args[0].shape[1], args[1].shape[0],
                             args[1].dtype))
            return func(*args, **(kwargs or {}))

    with Record():
        run()
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("rows, chunk_rows", [(37, 16), (5, 1024)])
def test_gemm_only_chain_runs_the_folded_runtimes_gemms(precision, rows, chunk_rows):
    """The GEMM ceiling of bench_cpu_solver is only a ceiling if it runs exactly the GEMMs
    (count, shapes, dtypes, order) that folded_solve runs on the same chunks."""
    import torch

    import fma_fast
    from fma_fast.solver.cpu import folded_solve

    gemm_chain = _load_benchmark_module("gemm_chain")
    torch.manual_seed(0)
    model = fma_fast.VelocityNet(dim=24, blocks=3, width=40)
    x = torch.nn.functional.normalize(torch.randn(rows, 24), dim=-1)
    with torch.no_grad():
        for p in model.parameters():  # an untrained net has zero output layers
            p.add_(0.1 * torch.randn_like(p))
    steps, blocks = 4, 3
    options = {"precision": precision, "chunk_rows": chunk_rows, "workers": 1}
    folded_solve(model, x, steps, 0.1, **options)  # fold the plan outside the recording
    solve = _recorded_gemms(lambda: folded_solve(model, x, steps, 0.1, **options))
    ceiling = _recorded_gemms(
        lambda: gemm_chain.gemm_only_solve(model, x, steps, 0.1, **options))
    chunks = -(-rows // chunk_rows)
    # fp32 final path: input once, 2 per block, feedback between steps, final once; bf16
    # states path: input, 2 per block and final in every step
    per_chunk = (1 + steps * 2 * blocks + steps - 1 + 1 if precision == "fp32"
                 else steps * (2 * blocks + 2))
    assert len(solve) == chunks * per_chunk, f"folded_solve ran {len(solve)} GEMMs: {solve}"
    assert ceiling == solve, f"GEMM-only chain {ceiling} != folded_solve {solve}"
