"""Run every benchmark with one command and keep a device-tagged JSON and markdown table.

    python benchmarks/run.py                  # all benchmarks/bench_*.py, default grids
    python benchmarks/run.py --quick          # only each file's "quick" grid (-k quick)
    python benchmarks/run.py -k gpu_solver    # any pytest -k selection
    python benchmarks/run.py benchmarks/bench_training.py --out my_results

Results go to ``<out>/<device>[-quick][-k-<expr>].json`` and ``.md`` (written atomically; the
default ``<out>`` is ``benchmarks/results/<device>/``), tagged
with the device, library versions, UTC date, git commit (+ dirty flag), wall time and the 1-min
load average. The run exits non-zero when a benchmark fails or errors (the files are still
written, marked FAILED); GPU-only files skip on the CPU and the table lists why.

Conventions the benchmark files follow (read from pytest-benchmark's JSON):

* ``benchmark.group`` names one comparison; without it the group is the test function plus its
  parameters other than ``path``, the variant axis.
* ``extra_info["unit"]`` and ``extra_info["throughput"]`` give the throughput (or a key like
  ``rows_per_s``); ``extra_info["peak_bytes"]`` a peak memory.
* ``extra_info["baseline"] = True`` marks the group's baseline (else the ``path`` "released");
  every other entry gets its speed-up over it, from median times measured in the same run.
* Every file parametrizes a "quick" and a "full" grid, so ``--quick`` is ``-k quick``.

The child runs in the caller's environment, OpenMP settings included, because that is what a
user gets; ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` for a host shared with other busy
processes, where OpenMP's spin-waiting can make a multi-threaded op many times slower. The
folded CPU solve uses row-parallel workers and no per-op barrier, so it barely notices.
``TRITON_INTERPRET`` is dropped: the interpreter is a test tool, not a speed measurement.

The benchmark files need pytest-benchmark's ``benchmark`` fixture: without the plugin run.py
refuses with one line (exit 2) rather than let pytest error. A SIGINT (Ctrl-C, or
``gpu_check.sh``'s time box) stops pytest, which still writes its reports: the results of the
benchmarks that finished are written, marked INTERRUPTED.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from fma_fast.core.environment import cpu_name, package_version
from fma_fast.io.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
RESULTS = BENCH_DIR / "results"
"""Per device ``results/<device slug>/`` (what run.py and gpu_check.sh write); analysis notes
in ``results/notes/``, ahead-of-time compile tables in ``results/aot/``."""
VARIANT_PARAM = "path"
RELEASED = "released"
KNOWN_EXTRA = ("unit", "throughput", "baseline", "peak_bytes")


def slug(text: str) -> str:
    """A file-name-safe lower-case form: runs of other characters become one '-'."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_info() -> dict[str, Any]:
    """The GPU that benchmarks use, or the CPU model and core count without one."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return {"kind": "cuda", "name": name, "cuda": torch.version.cuda, "slug": slug(name)}
    model = cpu_name()
    cores = os.cpu_count() or 1
    return {
        "kind": "cpu",
        "name": f"{model} ({cores} cores)",
        "cores": cores,
        "threads": torch.get_num_threads(),
        "slug": f"{slug(model)}-{cores}-cores",
    }


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        **{name: package_version(name)
           for name in ("torch", "triton", "fma_fast", "pytest-benchmark")},
    }


def git_info(repo: Path = REPO) -> dict[str, Any]:
    """The commit benchmarked and whether the working tree differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or "unknown", "dirty": bool(git("status", "--porcelain"))}


def outcomes(junit: Path) -> dict[str, Any]:
    """Pass/fail/skip counts, failed test ids and skip reasons from pytest's JUnit XML."""
    result: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [],
                              "skip_reasons": {}}
    if not junit.is_file():
        return result
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("name"):  # the test a SIGINT stopped: pytest writes a nameless entry
            continue
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            result["failed"] += 1
            result["failures"].append(f"{test}: {problem.get('message', '')[:300]}")
        elif skipped is not None:
            result["skipped"] += 1
            key = f"{case.get('classname', '')}: {skipped.get('message', '')}"
            result["skip_reasons"][key] = result["skip_reasons"].get(key, 0) + 1
        else:
            result["passed"] += 1
    return result


def _throughput(extra: dict[str, Any]) -> tuple[float | None, str]:
    if "throughput" in extra:
        return extra["throughput"], extra.get("unit", "/s")
    for key, value in extra.items():
        if key.endswith("_per_s") and isinstance(value, (int, float)):
            return value, key.removesuffix("_per_s") + "/s"
    return None, ""


def _group_and_label(bench: dict[str, Any]) -> tuple[str, str]:
    params = bench.get("params") or {}
    label = str(params.get(VARIANT_PARAM, bench["name"]))
    if bench.get("group"):
        return bench["group"], label
    module, _, test = bench["fullname"].partition("::")
    test = test.split("[", 1)[0]
    rest = ", ".join(f"{k}={v}" for k, v in params.items() if k != VARIANT_PARAM)
    return f"{Path(module).stem}.{test}" + (f" [{rest}]" if rest else ""), label


def build_report(raw: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Group pytest-benchmark's entries and compute each one's speed-up over its baseline."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for bench in raw.get("benchmarks", []):
        stats, extra = bench["stats"], dict(bench.get("extra_info") or {})
        group, label = _group_and_label(bench)
        throughput, unit = _throughput(extra)
        params = bench.get("params") or {}
        groups.setdefault(group, []).append({
            "label": label,
            "test": bench["fullname"],
            "params": params,
            "median_s": stats["median"],
            "min_s": stats["min"],
            "mean_s": stats["mean"],
            "stddev_s": stats["stddev"],
            "rounds": stats["rounds"],
            "iterations": stats.get("iterations", 1),
            "throughput": throughput,
            "unit": unit,
            "peak_bytes": extra.get("peak_bytes"),
            "baseline": bool(extra.get("baseline", params.get(VARIANT_PARAM) == RELEASED)),
            "extra_info": extra,
        })
    report_groups = []
    for name, entries in groups.items():
        baseline = next((e for e in entries if e["baseline"]), None)
        for entry in entries:
            entry["speedup"] = baseline["median_s"] / entry["median_s"] if baseline else None
        entries.sort(key=lambda e: (not e["baseline"], e["median_s"]))
        report_groups.append({"name": name, "baseline": baseline and baseline["label"],
                              "benchmarks": entries})
    return {**meta, "groups": report_groups}


def _seconds(value: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render_markdown(report: dict[str, Any]) -> str:
    device, git, out = report["device"], report["git"], report["outcome"]
    lines = [f"# Benchmarks: {device['name']}", ""]
    if report["status"] == "interrupted":
        lines += ["**INTERRUPTED** (SIGINT): the numbers below are from the benchmarks that "
                  "finished before it.", ""]
    if out["failed"] or report["status"] == "failed":
        lines += [f"**FAILED: {out['failed']} benchmark test(s) failed or errored** "
                  "(numbers below are from the tests that passed):", ""]
        lines += [f"- `{failure}`" for failure in out["failures"]] + [""]
    load = report["loadavg_1min"]
    lines += [
        f"- date (UTC): {report['date_utc']}",
        f"- commit: `{git['commit'][:12]}`" + (" (dirty working tree)" if git["dirty"] else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- command: `{report['command']}`",
        f"- wall time: {report['wall_s']:.0f} s; 1-min load average: {load['before']:.2f} "
        f"before, {load['after']:.2f} after"
        + (f"; torch threads: {device['threads']}" if "threads" in device else ""),
        f"- environment: {', '.join(f'{k}={v}' for k, v in report['environment'].items())}",
        f"- tests: {out['passed']} passed, {out['failed']} failed, {out['skipped']} skipped",
        "",
        "Speed-up = the baseline's median time / this median time, both from this run. "
        "Throughput is the benchmark's own figure (its file says whether from the median or "
        "the best round).",
    ]
    for group in report["groups"]:
        lines += ["", f"## {group['name']}", ""]
        lines += ["| benchmark | median | min | throughput | speed-up | peak memory | notes |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for e in group["benchmarks"]:
            label = f"{e['label']} (baseline)" if e["baseline"] else e["label"]
            throughput = f"{_number(e['throughput'])} {e['unit']}" if e["throughput"] else ""
            speedup = f"{e['speedup']:.2f}x" if e["speedup"] is not None else ""
            peak = f"{e['peak_bytes'] / 2**20:,.1f} MiB" if e["peak_bytes"] is not None else ""
            notes = ", ".join(f"{k}={_number(v)}" for k, v in e["extra_info"].items()
                              if k not in KNOWN_EXTRA and not k.endswith("_per_s"))
            lines.append(f"| {label} | {_seconds(e['median_s'])} | {_seconds(e['min_s'])} | "
                         f"{throughput} | {speedup} | {peak} | {notes} |")
    if out["skip_reasons"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {reason} ({count} test{'s' * (count > 1)})"
                  for reason, count in out["skip_reasons"].items()]
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` and ``.md``, each written atomically."""
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    text = json.dumps(report, indent=1, default=str) + "\n"
    atomic_write(json_path, lambda p: p.write_text(text, encoding="utf-8"))
    markdown = render_markdown(report)
    atomic_write(md_path, lambda p: p.write_text(markdown, encoding="utf-8"))
    return json_path, md_path


def benchmark_plugin() -> str | None:
    """Why the benchmarks cannot run here (pytest-benchmark missing), or None."""
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return ("pytest-benchmark is not installed (the benchmark files need its `benchmark` "
                "fixture): pip install pytest-benchmark")
    return None


def run_pytest(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """pytest's exit code, and whether a SIGINT arrived meanwhile. pytest gets the signal too
    (one process group) and writes its reports before it exits; this process waits for that
    instead of dying (or killing pytest, as ``subprocess.run`` would)."""
    interrupted = False

    def note(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, note)  # a handler, not SIG_IGN: pytest keeps SIGINT
    try:
        code = subprocess.Popen(command, cwd=REPO, env=env).wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return code, interrupted


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help="benchmark files (default: benchmarks/bench_*.py)")
    parser.add_argument("--quick", action="store_true", help="only the quick grids (-k quick)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/<device slug>)")
    parser.add_argument("--name", help="base name of the result files (default: from device)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="run with OMP_WAIT_POLICY=PASSIVE (for a host shared with busy "
                             "processes)")
    parser.add_argument("--device-slug", action="store_true",
                        help="print the device's folder name under benchmarks/results and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device_slug:
        print(device_info()["slug"])
        return 0
    missing = benchmark_plugin()
    if missing:
        print(f"run.py: {missing}", file=sys.stderr)
        return 2
    files = [str(f) for f in args.files] or sorted(
        str(p.relative_to(REPO)) for p in BENCH_DIR.glob("bench_*.py"))
    keyword = " and ".join(k for k in ("quick" if args.quick else None,
                                       f"({args.keyword})" if args.keyword else None) if k)
    device = device_info()
    env = dict(os.environ)
    if env.pop("TRITON_INTERPRET", None):
        print("run.py: ignoring TRITON_INTERPRET: the interpreter is not a speed measurement")
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    name = args.name or device["slug"] + ("-quick" if args.quick else "") + (
        f"-k-{slug(args.keyword)}" if args.keyword else "")

    with tempfile.TemporaryDirectory() as scratch:
        raw_path, junit = Path(scratch) / "benchmark.json", Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", *files, f"--benchmark-json={raw_path}",
                   f"--junitxml={junit}", "-p", "no:cacheprovider",
                   "--benchmark-columns=min,median,max,rounds,iterations"]
        if keyword:
            command += ["-k", keyword]
        load_before, start = os.getloadavg()[0], time.perf_counter()
        code, interrupted = run_pytest(command, env)
        wall, load_after = time.perf_counter() - start, os.getloadavg()[0]
        raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
        outcome = outcomes(junit)

    meta = {
        "status": "interrupted" if interrupted else "ok" if code == 0 else "failed",
        "pytest_exit_code": code,
        "device": device,
        "versions": versions(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_info(),
        "command": " ".join(["python benchmarks/run.py", *(argv if argv is not None
                                                           else sys.argv[1:])]),
        "keyword": keyword,
        "wall_s": round(wall, 1),
        "loadavg_1min": {"before": load_before, "after": load_after},
        "environment": {k: env.get(k, "unset") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                         "FMA_BENCH_COMPILE")},
        "outcome": outcome,
    }
    report = build_report(raw, meta)
    json_path, md_path = write_results(report, args.out or RESULTS / device["slug"], name)
    print(render_markdown(report))
    print(f"run.py: wrote {json_path} and {md_path} ({wall:.0f} s, 1-min load "
          f"{load_before:.2f} -> {load_after:.2f})")
    if code != 0:
        why = "no test was selected" if code == 5 else "interrupted (SIGINT)" if interrupted \
            else f"{outcome['failed']} test(s) failed or errored"
        print(f"run.py: benchmarks FAILED (pytest exit code {code}): {why}", file=sys.stderr)
        for failure in outcome["failures"]:
            print(f"  {failure}", file=sys.stderr)
    elif not report["groups"]:
        print("run.py: no benchmark ran (all skipped or deselected)")
    return code


if __name__ == "__main__":
    sys.exit(main())
