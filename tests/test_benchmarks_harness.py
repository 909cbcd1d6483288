"""benchmarks/run.py: grouping and speed-ups, the tagged result files, failing loudly, refusing
without pytest-benchmark and surviving a SIGINT; benchmarks/gpu_check.sh on a machine without a
GPU: its plan, its stages without the optional plugins, its time boxes and kept logs.

The end-to-end test runs run.py on a tiny benchmark file (no torch in the child), so it checks
the real pytest-benchmark JSON and JUnit plumbing in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
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


def _load_baseline(name: str):
    path = RUN_PY.parent / "baselines" / f"{name}.py"
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

    gemm_chain = _load_baseline("gemm_chain")
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


# ------------------------------------------------------------------ gpu_check.sh, on the CPU

GPU_CHECK = RUN_PY.parent / "gpu_check.sh"
needs_bash = pytest.mark.skipif(os.name != "posix", reason="SKIPPED, not passed: needs bash")

SITECUSTOMIZE = '''
import sys


class _Missing:
    """As if pytest-benchmark and pytest-xdist were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"pytest_benchmark", "xdist"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, _Missing())
'''


@pytest.fixture
def bare_python(tmp_path) -> Path:
    """A python like the GPU machine's may be: no pytest-benchmark, no pytest-xdist (their
    imports fail and pytest loads no plugin from entry points)."""
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{folder}${{PYTHONPATH:+:$PYTHONPATH}}" '
                      f'PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python


def _gpu_check(*args: str, python: str | Path = sys.executable, timeout: int = 300
               ) -> subprocess.CompletedProcess:
    """gpu_check.sh without a GPU, started as a background job of a script would be: with
    SIGINT ignored, which its children inherit unless it restores it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=str(python))
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True,
                          env=env, timeout=timeout,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _stages(out: Path) -> dict[str, dict]:
    (result,) = out.glob("*-gpu-check.json")
    return {stage["stage"]: stage for stage in json.loads(result.read_text())["stages"]}


@needs_bash
def test_gpu_check_plan_lists_every_stage_with_its_times_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    done = _gpu_check("--plan", str(out), python="/nonexistent/python")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu_check plan: budget 540 s")
    rows = {line.split()[0]: line.split() for line in lines[2:9]}
    assert list(rows) == ["doctor", "smoke", "tests", "solver", "kernels", "solvegrad", "total"]
    for name, row in rows.items():
        numbers = row[1:4] if name == "total" else row[2:5]
        assert all(number.isdigit() for number in numbers), row
    assert int(rows["total"][1]) == sum(int(rows[n][2]) for n in rows if n != "total")
    assert any(line.startswith("Cold, with pytest-xdist: expected") for line in lines)
    assert not out.exists(), "--plan must not run or write anything"


@needs_bash
def test_gpu_check_completes_without_the_optional_plugins_and_resumes(tmp_path, bare_python):
    """No GPU and no pytest-benchmark/xdist: every stage is accounted for with its reason, the
    logs stay in OUT, and a second run resumes (the doctor passed for the same sources)."""
    out = tmp_path / "out"
    done = _gpu_check(str(out), python=bare_python)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    work = out / "gpu-check"
    probes = (work / "probes.txt").read_text()
    assert "pytest-benchmark no" in probes and "pytest-xdist no" in probes, probes
    stages = _stages(out)
    assert stages["doctor"]["status"] == "passed"
    for name in ("smoke", "tests", "solver", "kernels", "solvegrad"):
        assert stages[name]["status"] == "skipped", stages[name]
        assert "no CUDA device here" in stages[name]["reason"]
    assert "pytest-benchmark is not installed" in stages["solver"]["reason"]
    assert "fma_fast" in (work / "doctor.log").read_text()  # the log survives the run
    markdown = next(out.glob("*-gpu-check.md")).read_text()
    assert "| tests | skipped |" in markdown and "## Doctor" in markdown

    again = _gpu_check(str(out), python=bare_python)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert _stages(out)["doctor"]["status"] == "passed (earlier run)"


STAND_IN_DOCTOR = """#!/bin/bash
# The Python gpu_check.sh runs, but its doctor stage sleeps: it outlasts any box of seconds.
if [ "$1 $2 $3" = "-m fma_fast.cli doctor" ]; then
  exec {python} -c "import time; print('stand-in doctor', flush=True); time.sleep(300)"
fi
exec {python} "$@"
"""


@needs_bash
def test_a_stage_past_its_box_is_stopped_with_sigint_and_keeps_its_log(tmp_path):
    """The doctor stage stands in for any stage that outruns its box: a sleeping one, as the
    real doctor (kernel checks skipped without a GPU) could finish within a 1 s box. The box
    is 5 s: a Python interrupted before it has set up its SIGINT handler (start-up on a
    loaded machine) dies without the KeyboardInterrupt this test looks for."""
    python = tmp_path / "python"
    python.write_text(STAND_IN_DOCTOR.format(python=shlex.quote(sys.executable)))
    python.chmod(0o755)
    out = tmp_path / "out"
    done = _gpu_check("--only", "doctor", "--box", "doctor=5", str(out), python=python)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stage = _stages(out)["doctor"]
    assert stage["status"] == "timed out" and "5 s box" in stage["reason"], stage
    log = (out / "gpu-check" / "doctor.log").read_text()
    assert "stand-in doctor" in log and "KeyboardInterrupt" in log, log[-1000:]  # SIGINT,
    assert "rerun gpu_check.sh to resume" in done.stdout  # not SIGTERM: Python saw Ctrl-C


def test_the_smoke_tests_exist():
    """gpu_check.sh names its smoke tests by node id: each must still be collected."""
    script = GPU_CHECK.read_text()
    block = script[script.index("\nSMOKE=(") + 1:]
    ids = re.findall(r'^\s+"(tests/[^"]+)"$', block[:block.index("\n)")], flags=re.M)
    assert len(ids) >= 8, ids
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *ids], capture_output=True, text=True,
                          cwd=RUN_PY.parents[1], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = set(done.stdout.split())
    assert set(ids) <= collected, sorted(set(ids) - collected)


def test_run_py_without_pytest_benchmark_refuses_in_one_line(tmp_path, bare_python):
    bench = tmp_path / "bench_tiny.py"
    bench.write_text(textwrap.dedent(TINY_BENCH))
    done = subprocess.run([str(bare_python), str(RUN_PY), str(bench), "--out",
                           str(tmp_path / "results")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "run.py: pytest-benchmark is not installed (the benchmark files need its `benchmark` "
        "fixture): pip install pytest-benchmark"], done.stderr
    assert not (tmp_path / "results").exists()


SLOW_BENCH = '''
import time
from pathlib import Path


def test_quick(benchmark):
    benchmark.pedantic(lambda: sum(range(1000)), rounds=2)


def test_slow(benchmark):
    Path(__file__).with_name("started").write_text("")
    time.sleep(120)
'''


@needs_bash
def test_run_py_interrupted_keeps_what_pytest_reported(tmp_path):
    """SIGINT to the process group (Ctrl-C, or gpu_check's box): pytest writes its reports and
    run.py writes the finished benchmarks, marked interrupted, instead of dying with them."""
    bench = tmp_path / "bench_slow.py"
    bench.write_text(SLOW_BENCH)
    process = subprocess.Popen([sys.executable, str(RUN_PY), str(bench), "--out",
                                str(tmp_path / "results"), "--name", "slow"],
                               start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-2000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output[-2000:]
    report = json.loads((tmp_path / "results" / "slow.json").read_text())
    assert report["status"] == "interrupted", report["status"]
    assert report["outcome"]["passed"] == 1, report["outcome"]
    assert [group["benchmarks"][0]["label"] for group in report["groups"]] == ["test_quick"]
    assert "**INTERRUPTED**" in (tmp_path / "results" / "slow.md").read_text()
