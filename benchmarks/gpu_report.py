"""Merge what ``benchmarks/gpu_check.sh`` produced into ``<out>/<gpu>.md`` and ``.json``.

Reads, from the check's work folder: ``stages.txt`` (one line per stage: name, exit status or
"skip", seconds, reason), the doctor's JSON, the tests' JUnit XML and the benchmark reports
``benchmarks/run.py`` wrote (``solver.json``, ``kernels.json``). Every stage appears in the
result, with its status; a stage that failed or timed out keeps what it wrote before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from run import device_info, git_info, outcomes, render_markdown, versions

from fma_fast.io.files import write_text

BENCHMARK_STAGES = ("solver", "kernels")


def read_stages(work: Path) -> list[dict[str, Any]]:
    stages = []
    path = work / "stages.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        name, code, seconds, *reason = line.split(" ", 3)
        if code == "skip":
            status = "skipped"
        elif code == "0":
            status = "passed"
        elif code in ("124", "137"):
            status = "timed out"
        else:
            status = f"failed (exit {code})"
        stages.append({"stage": name, "status": status, "seconds": int(seconds),
                       "reason": reason[0] if reason else ""})
    return stages


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(work: Path, seconds: int) -> dict[str, Any]:
    from datetime import datetime, timezone

    return {
        "device": device_info(),
        "versions": versions(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_info(),
        "command": "bash benchmarks/gpu_check.sh",
        "wall_s": seconds,
        "stages": read_stages(work),
        "doctor": _json(work / "doctor.json"),
        "tests": outcomes(work / "tests.xml") if (work / "tests.xml").is_file() else None,
        "benchmarks": {name: _json(work / f"{name}.json") for name in BENCHMARK_STAGES},
    }


def render(result: dict[str, Any]) -> str:
    device, git = result["device"], result["git"]
    lines = [f"# GPU check: {device['name']}", "",
             f"- date (UTC): {result['date_utc']}",
             f"- commit: `{git['commit'][:12]}`" + (" (dirty tree)" if git["dirty"] else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"- command: `{result['command']}`, {result['wall_s']} s in all", "",
             "| stage | status | seconds | reason |", "|---|---|---:|---|"]
    for stage in result["stages"]:
        lines.append(f"| {stage['stage']} | {stage['status']} | {stage['seconds']} | "
                     f"{stage['reason']} |")
    doctor = result["doctor"]
    if doctor:
        lines += ["", "## Doctor", "", "| kernel check | result | max error | first call (s) | "
                  "warm call (s) | detail |", "|---|---|---:|---:|---:|---|"]
        for row in doctor["checks"]:
            error = "" if row["max_error"] is None else f"{row['max_error']:.2e}"
            lines.append(f"| {row['name']} | {row['status']} | {error} | "
                         f"{row['first_call_s'] or ''} | {row['warm_call_s'] or ''} | "
                         f"{row['detail']} |")
        routes = doctor["routes"]
        lines += ["", "Paths: " + ", ".join(f"{op} → {path}" for op, path in
                                            routes["ops"].items())
                  + "; solve: " + ", ".join(f"{p} → {r}" for p, r in routes["solve"].items())]
    tests = result["tests"]
    if tests:
        lines += ["", "## CUDA tests", "",
                  f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} "
                  "skipped"]
        lines += [f"- FAILED `{failure}`" for failure in tests["failures"]]
        lines += [f"- skipped: {reason} ({count})" for reason, count in
                  tests["skip_reasons"].items()]
    for name, report in result["benchmarks"].items():
        if report:
            body = render_markdown(report).split("\n", 2)[2]  # without its own title
            lines += ["", f"## Benchmarks: {name}", "", body.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args(argv)
    result = collect(args.work, args.seconds)
    name = result["device"]["slug"] if result["device"]["kind"] == "cuda" else (
        result["device"]["slug"] + "-gpu-check")
    text = render(result)
    write_text(args.out / f"{name}.json", json.dumps(result, indent=1, default=str) + "\n")
    write_text(args.out / f"{name}.md", text)
    print(text)
    print(f"gpu_report: wrote {args.out / name}.md and .json")
    cuda = result["device"]["kind"] == "cuda"
    bad = [s for s in result["stages"] if s["status"] not in ("passed", "skipped")]
    doctor_failed = bool(result["doctor"] and result["doctor"]["failed"])
    return 1 if cuda and (bad or doctor_failed) else 0


if __name__ == "__main__":
    sys.exit(main())
