"""CPU solve throughput (rows/s): the released loop and the reference vs the folded plan.

The field is trained briefly on a synthetic task (``make_task`` + ``fit``), so the bf16 path is
also checked where it matters: its predictions must agree with fp32 on >= 99% of test rows.
Timed rounds exclude folding the plan (cached on the model; its build time is in extra_info).
This host's speed drifts by 10-30% over minutes, so ``test_paired_rounds`` also interleaves
released, fp32 and bf16 rounds with each precision's GEMM-only chain (``gemm_chain.py``: the
same GEMMs on the same chunks and workers, nothing else) and reports their ratios from the
same minute: to the released loop, and to the GEMM ceiling of the torch chain.

    python -m pytest benchmarks/bench_cpu_solver.py              # both grids, ~6 minutes
    python -m pytest benchmarks/bench_cpu_solver.py -k quick     # seconds
    FMA_BENCH_SWEEP=1 python -m pytest benchmarks/bench_cpu_solver.py -k "sweep and full"

Targets (issue 16, D=512, 12 blocks, M=10, N=16,384, 2 cores): folded fp32 >= 3x the released
loop with identical predictions and within 10% of its GEMM-only chain; bf16 >= 14x the released
loop (eager, or ``test_compiled_solve``'s compiled steps; see
benchmarks/results/notes/cpu-speed.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from baselines.gemm_chain import gemm_only_solve
from baselines.released_loop import released_solve

import fma_fast
from fma_fast import reference, synthetic
from fma_fast.core.policy import PRECISION_DTYPES
from fma_fast.solver.cpu import folded_solve
from fma_fast.solver.plan import build_plan, solver_plan

STEPS, STEP_SIZE = 10, 0.1
ROUNDS = 3
GRIDS = {
    "full": {"dim": 512, "blocks": 12, "classes": 16, "test_per_class": 1024, "epochs": 8},
    "quick": {"dim": 256, "blocks": 4, "classes": 16, "test_per_class": 64, "epochs": 8},
}
PATHS = ("released", "reference", "folded-fp32", "folded-bf16")
BF16_AGREEMENT = 0.99


@dataclass
class Trained:
    grid: str
    model: fma_fast.VelocityNet
    features: torch.Tensor
    class_features: torch.Tensor

    def describe(self) -> str:
        return (f"{self.grid}: N={self.features.shape[0]}, D={self.model.dim}, "
                f"{self.model.blocks} blocks, M={STEPS}")


@pytest.fixture(scope="module", params=sorted(GRIDS))
def trained(request) -> Trained:
    grid = GRIDS[request.param]
    task = synthetic.make_task(num_classes=grid["classes"], dim=grid["dim"], shots=16,
                               test_per_class=grid["test_per_class"], seed=11)
    fitted = fma_fast.fit(task.train.features, task.train.labels, task.class_features,
                          blocks=grid["blocks"], epochs=grid["epochs"], device="cpu",
                          progress=False, seed=11)
    return Trained(request.param, fitted.model, task.test.features, task.class_features)


@pytest.fixture(scope="module")
def throughput_log(request) -> Iterator[list]:
    """Rows (group, path, rows/s, load before, load after), printed as a table at module end."""
    rows: list = []
    yield rows
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if not rows or reporter is None or capture is None:
        return
    released = {group: rate for group, path, rate, *_ in rows if path == "released"}
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line("")
        reporter.write_line(f"{'rows/s (best round)':<66}{'path':<14}{'rows/s':>8}"
                            f"{'vs released':>13}{'1-min load before/after':>26}")
        for group, path, rate, before, after in rows:
            ratio = f"{rate / released[group]:.2f}x" if group in released else "-"
            reporter.write_line(f"{group:<66}{path:<14}{rate:>8.0f}{ratio:>13}"
                                f"{before:>20.2f} / {after:.2f}")


def _solver(path: str, model: fma_fast.VelocityNet):
    if path == "released":
        return lambda x: released_solve(model, x, STEPS, STEP_SIZE)
    if path.startswith("gemm-only-"):
        precision = path.removeprefix("gemm-only-")
        return lambda x: gemm_only_solve(model, x, STEPS, STEP_SIZE, precision=precision)
    if path == "reference":
        return torch.no_grad()(lambda x: reference.euler_solve(model, x, STEPS, STEP_SIZE))
    precision = path.removeprefix("folded-")
    return lambda x: folded_solve(model, x, STEPS, STEP_SIZE, precision=precision)


@pytest.mark.parametrize("path", PATHS)
def test_throughput(benchmark, trained, path, throughput_log):
    x = trained.features
    solve = _solver(path, trained.model)
    if path.startswith("folded"):
        dtype = PRECISION_DTYPES[path.removeprefix("folded-")]
        start = time.perf_counter()
        build_plan(trained.model, STEPS, STEP_SIZE, dtype=dtype)
        benchmark.extra_info["plan_build_s"] = round(time.perf_counter() - start, 3)
        solver_plan(trained.model, STEPS, STEP_SIZE, dtype=dtype)  # the plan the solve uses
    solve(x[:256])  # warm-up: first-touch allocations, oneDNN primitive creation
    load_before = os.getloadavg()[0]
    benchmark.group = f"CPU solve ({trained.describe()})"
    benchmark.pedantic(solve, args=(x,), rounds=ROUNDS, iterations=1)
    load_after = os.getloadavg()[0]
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        unit="rows/s", throughput=round(x.shape[0] / stats.median, 1),
        rows_per_s_best=round(x.shape[0] / stats.min, 1), threads=torch.get_num_threads(),
        load_before=load_before, load_after=load_after,
    )
    throughput_log.append((benchmark.group, path, x.shape[0] / stats.min, load_before,
                           load_after))


def _paired_rounds(benchmark, group: str, solvers: dict, x: torch.Tensor,
                   throughput_log: list) -> dict[str, float]:
    """Every solver on ``x`` once per round, interleaved, ROUNDS rounds: rows/s of each one's
    best round (logged, and with the loads and threads in extra_info)."""
    best = dict.fromkeys(solvers, float("inf"))

    def one_round() -> None:
        for path, solve in solvers.items():
            start = time.perf_counter()
            solve(x)
            best[path] = min(best[path], time.perf_counter() - start)

    load_before = os.getloadavg()[0]
    benchmark.group = group
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    load_after = os.getloadavg()[0]
    rates = {path: x.shape[0] / seconds for path, seconds in best.items()}
    benchmark.extra_info.update(load_before=load_before, load_after=load_after,
                                threads=torch.get_num_threads())
    for path, rate in rates.items():
        throughput_log.append((group, path, rate, load_before, load_after))
    return rates


def test_paired_rounds(benchmark, trained, throughput_log):
    """Released, fp32, bf16 and each precision's GEMM-only chain interleaved in every round, so
    host drift hits them alike: the ratios to the released loop and to the GEMM ceiling."""
    x = trained.features
    paths = ("released", "folded-fp32", "gemm-only-fp32", "folded-bf16", "gemm-only-bf16")
    solvers = {path: _solver(path, trained.model) for path in paths}
    for solve in solvers.values():
        solve(x[:256])
    rates = _paired_rounds(benchmark, f"CPU solve, paired rounds ({trained.describe()})",
                           solvers, x, throughput_log)
    benchmark.extra_info.update({f"{path.removeprefix('folded-')}_rows_per_s": round(rate, 1)
                                 for path, rate in rates.items()})
    for precision in ("fp32", "bf16"):
        folded = rates[f"folded-{precision}"]
        benchmark.extra_info[f"{precision}_vs_released"] = round(folded / rates["released"], 2)
        benchmark.extra_info[f"{precision}_of_gemm_only"] = round(
            folded / rates[f"gemm-only-{precision}"], 3)


def test_compiled_solve(benchmark, trained, throughput_log):
    """``solve(backend="compiled")``'s runtime (bf16 steps as compiled modules) against the
    eager bf16 chain and the released loop, interleaved; the compile time (first call in this
    process, inductor's on-disk cache as it stands) and the agreement with fp32."""
    if trained.grid != "full":
        pytest.skip("compiling takes minutes: full grid only")
    x, z = trained.features, trained.class_features
    model = trained.model
    start = time.perf_counter()
    folded_solve(model, x[:256], STEPS, STEP_SIZE, precision="bf16", compiled=True)
    compile_s = time.perf_counter() - start
    solvers = {"released": _solver("released", model), "folded-bf16": _solver("folded-bf16", model),
               "compiled-bf16": lambda rows: folded_solve(model, rows, STEPS, STEP_SIZE,
                                                          precision="bf16", compiled=True)}
    for solve in solvers.values():
        solve(x[:256])
    rates = _paired_rounds(
        benchmark, f"CPU solve, compiled bf16, paired rounds ({trained.describe()})", solvers,
        x, throughput_log)
    with torch.no_grad():
        fp32 = folded_solve(model, x, STEPS, STEP_SIZE)
        compiled = solvers["compiled-bf16"](x)
    wanted = reference.cosine_logits(fp32, z).argmax(-1)
    agreement = 1 - len(_mismatches(compiled, wanted, z)) / x.shape[0]
    benchmark.extra_info.update(
        {f"{path}_rows_per_s": round(rate, 1) for path, rate in rates.items()},
        compile_s=round(compile_s, 1), agreement_with_fp32=round(agreement, 4),
        compiled_vs_released=round(rates["compiled-bf16"] / rates["released"], 2),
        compiled_vs_eager_bf16=round(rates["compiled-bf16"] / rates["folded-bf16"], 3),
    )
    assert agreement >= BF16_AGREEMENT, f"compiled bf16 agrees with fp32 on {agreement:.2%}"


def _mismatches(state: torch.Tensor, wanted: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (reference.cosine_logits(state, z).argmax(-1) != wanted).nonzero().flatten()


def test_predictions_against_the_reference(trained):
    """The timed paths' predictions vs the fp32 reference: fp32 identical (final-only path and
    every state of the trajectory path, and the released loop too), bf16 on >= 99% of rows."""
    x, z = trained.features, trained.class_features
    with torch.no_grad():
        expected = [reference.cosine_logits(state, z).argmax(-1) for state in
                    reference.euler_solve(trained.model, x, STEPS, STEP_SIZE,
                                          return_trajectory=True)]
        released = released_solve(trained.model, x, STEPS, STEP_SIZE)
    final = {precision: folded_solve(trained.model, x, STEPS, STEP_SIZE, precision=precision)
             for precision in ("fp32", "bf16")}
    for name, state in (("released loop", released), ("folded fp32", final["fp32"])):
        rows = _mismatches(state, expected[-1], z).tolist()
        assert not rows, f"{trained.grid}, M={STEPS}: {name} differs from the reference on {rows}"
    for precision in ("fp32", "bf16"):
        states = folded_solve(trained.model, x, STEPS, STEP_SIZE, precision=precision,
                              return_trajectory=True) + [final[precision]]
        for steps, state in enumerate(states[1:], start=1):
            wanted = expected[min(steps, STEPS)]
            where = f"{trained.grid} {precision}, M={min(steps, STEPS)}"
            rows = _mismatches(state, wanted, z)
            if precision == "fp32":
                assert not len(rows), f"{where}: rows {rows.tolist()} differ from the reference"
            agreement = 1 - len(rows) / x.shape[0]
            assert agreement >= BF16_AGREEMENT, (
                f"{where}: agrees with the fp32 reference on {agreement:.2%} of rows")


@pytest.mark.skipif(not os.environ.get("FMA_BENCH_SWEEP"), reason="set FMA_BENCH_SWEEP=1")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16 is for CUDA
@pytest.mark.parametrize("chunk_rows", [256, 512, 1024, 2048, 4096])
def test_chunk_rows_sweep(benchmark, trained, precision, chunk_rows, throughput_log):
    """Rows/s by chunk size: how ``policy.CPU_CHUNK_ROWS`` was chosen."""
    x = trained.features
    plan = solver_plan(trained.model, STEPS, STEP_SIZE, dtype=PRECISION_DTYPES[precision])
    folded_solve(plan, x[:256], STEPS, STEP_SIZE, precision=precision, chunk_rows=chunk_rows)
    load_before = os.getloadavg()[0]
    benchmark.group = f"CPU solve chunk rows, {precision} ({trained.describe()})"
    benchmark.pedantic(folded_solve, args=(plan, x, STEPS, STEP_SIZE),
                       kwargs={"precision": precision, "chunk_rows": chunk_rows},
                       rounds=ROUNDS, iterations=1)
    rate = x.shape[0] / benchmark.stats.stats.min
    benchmark.extra_info.update(unit="rows/s", throughput=round(rate, 1), chunk_rows=chunk_rows)
    throughput_log.append((benchmark.group, f"{chunk_rows} rows", rate, load_before,
                           os.getloadavg()[0]))


@pytest.mark.parametrize("rows", [256, 4096])
def test_plan_cache_check(benchmark, trained, rows):
    """What the plan cache's weights check costs one ``solve`` call: a cache hit (which
    compares every weight with the copy the plan was folded from) against the whole call,
    interleaved in every round."""
    x = trained.features[:rows]
    model = trained.model
    fma_fast.solve(x, model, STEPS)  # folds and caches the plan
    best = {"check": float("inf"), "solve": float("inf")}

    def one_round() -> None:
        start = time.perf_counter()
        solver_plan(model, STEPS, STEP_SIZE)
        middle = time.perf_counter()
        fma_fast.solve(x, model, STEPS)
        end = time.perf_counter()
        best["check"] = min(best["check"], middle - start)
        best["solve"] = min(best["solve"], end - middle)

    benchmark.group = f"plan cache check, {x.shape[0]} rows ({trained.describe()})"
    benchmark.pedantic(one_round, rounds=5, iterations=1)
    benchmark.extra_info.update(
        check_ms=round(1e3 * best["check"], 2), solve_ms=round(1e3 * best["solve"], 1),
        check_share_of_solve=round(best["check"] / best["solve"], 4),
        weights=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads(),
    )
