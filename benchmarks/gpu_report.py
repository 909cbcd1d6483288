"""Merge what ``benchmarks/gpu_check.sh`` produced into ``<out>/<gpu>.md`` and ``.json``.

Reads, from the check's work folder: ``stages.txt`` (one line per stage: name; exit status,
"skip", "earlier" (passed in an earlier run) or "budget" (not reached); seconds; reason),
``probes.txt`` (the plugins found), the doctor's JSON, each pytest stage's JUnit XML
(``<stage>.xml``) and each benchmark stage's ``benchmarks/run.py`` report (``<stage>.json``).
Every stage appears in the result, with its status; a stage that failed or was stopped keeps
what it wrote before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from run import device_info, git_info, outcomes, render_markdown, versions

from fma_fast.io.files import write_text

STATUS = {"skip": "skipped", "earlier": "passed (earlier run)", "budget": "not reached",
          "0": "passed", "124": "timed out", "137": "timed out"}
GOOD = ("passed", "passed (earlier run)", "skipped")


def read_stages(work: Path) -> list[dict[str, Any]]:
    stages = []
    path = work / "stages.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        name, code, seconds, *reason = line.split(" ", 3)
        status = STATUS.get(code, f"failed (exit {code})")
        stages.append({"stage": name, "status": status, "seconds": int(seconds),
                       "reason": reason[0] if reason else ""})
    return stages


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_probes(work: Path) -> dict[str, str]:
    path = work / "probes.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return dict(line.split(" ", 1) for line in lines if " " in line)


def collect(work: Path, seconds: int) -> dict[str, Any]:
    from datetime import datetime, timezone

    stages = read_stages(work)
    names = [stage["stage"] for stage in stages]
    reports = {name: _json(work / f"{name}.json") for name in names}
    return {
        "device": device_info(),
        "versions": versions(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_info(),
        "command": "bash benchmarks/gpu_check.sh",
        "wall_s": seconds,
        "probes": read_probes(work),
        "stages": stages,
        "doctor": _json(work / "doctor.json"),
        "tests": {name: outcomes(work / f"{name}.xml") for name in names
                  if (work / f"{name}.xml").is_file()},
        "benchmarks": {name: report for name, report in reports.items()
                       if isinstance(report, dict) and "groups" in report},
    }


def render(result: dict[str, Any]) -> str:
    device, git = result["device"], result["git"]
    lines = [f"# GPU check: {device['name']}", "",
             f"- date (UTC): {result['date_utc']}",
             f"- commit: `{git['commit'][:12]}`" + (" (dirty tree)" if git["dirty"] else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"- command: `{result['command']}`, {result['wall_s']} s in all",
             "- found: " + ", ".join(f"{k} {v}" for k, v in result["probes"].items()), "",
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
    for name, tests in result["tests"].items():
        lines += ["", f"## CUDA tests: {name}", "",
                  f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} "
                  "skipped"]
        lines += [f"- FAILED `{failure}`" for failure in tests["failures"]]
        lines += [f"- skipped: {reason} ({count})" for reason, count in
                  tests["skip_reasons"].items()]
    for name, report in result["benchmarks"].items():
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
    bad = [s for s in result["stages"] if s["status"] not in GOOD]
    doctor_failed = bool(result["doctor"] and result["doctor"]["failed"])
    if bad:
        print("gpu_report: " + ", ".join(f"{s['stage']} {s['status']}" for s in bad)
              + ("; rerun gpu_check.sh to resume" if any(
                  s["status"] in ("timed out", "not reached") for s in bad) else ""))
    return 1 if cuda and (bad or doctor_failed) else 0


if __name__ == "__main__":
    sys.exit(main())
