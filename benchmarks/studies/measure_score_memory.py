"""Peak resident memory (RSS) of ``fma_fast.score`` as the number of rows N grows.

    python benchmarks/studies/measure_score_memory.py               # N=200,000 and 2,000,000
    python benchmarks/studies/measure_score_memory.py --rows 20000 200000 --threads 2

``score`` streams its inputs: it reads a chunk of rows at a time with positioned reads (no
memmap), a reader thread one chunk ahead, and holds at most one part's outputs
(``policy.SCORE_PART_ROWS`` rows) before writing them. So its peak RSS must not grow with N:
ten times the rows should cost about the same memory (target: peak RSS at the largest N within
10% of that at the smallest), only ten times the time.

For each N a (N, D) float32 ``.npy`` of random unit rows is written to a temporary folder
without ever being held in RAM (``np.lib.format.open_memmap``, filled in chunks), then scored in
a fresh child process, so that each measurement's high-water mark is its own. The child builds
a small ``VelocityNet`` (weights N(0, 0.03) under ``torch.manual_seed(0)``), records its
high-water mark after the imports and the model build (the baseline), runs ``fma_fast.score``
and reports the peak. ``score`` reads the file with positioned reads through the page cache,
which is not counted in a process's RSS. The temporary data (4 GB for 2M rows at D=512) is
deleted afterwards.

Two processes, not one, on the parent's side: on Linux a child's ``ru_maxrss`` starts at its
parent's high-water mark (``subprocess`` spawns with vfork + exec, and exec carries the old
memory map's high-water mark into ``ru_maxrss``), and a process that fills a 4 GB memmap has
touched 4 GB of resident (file-backed) pages. So the file is written by a helper process of its
own, the parent stays at a few tens of MiB, and the child also reports ``VmHWM`` from
``/proc/self/status`` (the high-water mark of its own memory map only) as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
FILL_ROWS = 65536


def _proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its high-water
    mark), or -1 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _maxrss_kib() -> int:
    """The process's resident-set high-water mark in KiB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def child(args: argparse.Namespace) -> dict:
    """Score one input file in this (fresh) process and return the numbers."""
    import torch

    import fma_fast
    from fma_fast.core.policy import SCORE_PART_ROWS

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = fma_fast.VelocityNet(args.dim, blocks=args.blocks)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.03)
    before_peak = _maxrss_kib()
    before_now, before_hwm = _proc_status_kib("VmRSS"), _proc_status_kib("VmHWM")
    summary = fma_fast.score(model, [args.child], args.classes_file, args.out, steps=args.steps,
                             topk=args.topk, progress=False)
    peak, hwm = _maxrss_kib(), _proc_status_kib("VmHWM")
    return {
        "rows": summary.rows, "rows_scored": summary.rows_scored, "parts": summary.parts,
        "seconds": summary.seconds, "rows_per_s": summary.rows_per_s, "path": summary.path,
        "maxrss_before_kib": before_peak, "rss_before_kib": before_now,
        "maxrss_peak_kib": peak, "rss_after_kib": _proc_status_kib("VmRSS"),
        "hwm_before_kib": before_hwm, "hwm_peak_kib": hwm,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "part_rows": SCORE_PART_ROWS,
    }


def _write_rows(path: Path, rows: int, dim: int, seed: int) -> None:
    """A (rows, dim) float32 .npy of random unit rows, filled a chunk at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, FILL_ROWS):
        chunk = rng.standard_normal((min(FILL_ROWS, rows - start), dim), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        array[start:start + chunk.shape[0]] = chunk
    array.flush()
    del array


def _write_classes(path: Path, classes: int, dim: int) -> None:
    import numpy as np

    table = np.random.default_rng(12345).standard_normal((classes, dim), dtype=np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    np.save(path, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000],
                        help="the Ns to measure (default: 200000 2000000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in the child (default: torch's default)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the child with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES "
                        "(a diagnostic: it turns off malloc's dynamic mmap threshold, so freed "
                        "multi-MiB buffers go back to the OS instead of fragmenting the heap)")
    parser.add_argument("--tmp", default=None, help="where the temporary data goes "
                        "(default: the system's temporary folder)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per N")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--classes-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.write:  # helper process: its memmap's resident pages stay out of the parent's peak
        _write_rows(Path(args.write), args.rows[0], args.dim, args.seed)
        return

    folder = Path(tempfile.mkdtemp(prefix="fma-score-memory-", dir=args.tmp))
    results = []
    load_before = os.getloadavg()[0]
    try:
        classes = folder / "classes.npy"
        _write_classes(classes, args.classes, args.dim)
        for rows in args.rows:
            data = folder / f"rows{rows}.npy"
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), "--write", str(data),
                            "--rows", str(rows), "--dim", str(args.dim), "--seed", str(rows)],
                           check=True)
            written = time.perf_counter() - start
            print(f"N={rows:,}: wrote {data.stat().st_size / 2**30:.2f} GiB in {written:.1f} s; "
                  "scoring in a child process", file=sys.stderr, flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--child", str(data),
                       "--classes-file", str(classes), "--out", str(folder / f"out{rows}"),
                       "--dim", str(args.dim), "--blocks", str(args.blocks),
                       "--steps", str(args.steps), "--topk", str(args.topk)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = dict(os.environ)
            if args.mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"N={rows:,}: the child failed (rc {done.returncode})\n"
                      f"{done.stderr[-3000:]}", file=sys.stderr)
                sys.exit(1)
            row = json.loads(done.stdout.splitlines()[-1])
            expected_parts = math.ceil(rows / row["part_rows"])
            if row["rows_scored"] != rows or row["parts"] != expected_parts:
                print(f"N={rows:,}: scored {row['rows_scored']:,} rows in {row['parts']} parts, "
                      f"expected {rows:,} in {expected_parts}", file=sys.stderr)
            results.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            data.unlink()
            shutil.rmtree(folder / f"out{rows}", ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()[0]

    first = results[0]
    print(f"\nfma_fast.score peak RSS: D={args.dim}, VelocityNet blocks={args.blocks}, "
          f"M={args.steps}, C={args.classes}, top-{args.topk}, torch {first['torch']}, "
          f"{first['threads']} threads, path {first['path']}; 1-min load {load_before:.2f} "
          f"before, {load_after:.2f} after; MALLOC_MMAP_THRESHOLD_ "
          f"{'unset' if args.mmap_threshold is None else args.mmap_threshold}\n")
    print(f"parent's own ru_maxrss: {_maxrss_kib() / 1024:.1f} MiB (what a child's ru_maxrss "
          "starts at)\n")
    print("| N | peak RSS MiB (ru_maxrss) | peak VmHWM MiB | RSS before scoring MiB | "
          "growth MiB | parts | seconds | rows/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        peak, before = row["maxrss_peak_kib"] / 1024, row["maxrss_before_kib"] / 1024
        print(f"| {row['rows']:,} | {peak:.1f} | {row['hwm_peak_kib'] / 1024:.1f} | "
              f"{before:.1f} | {peak - before:.1f} | {row['parts']} | {row['seconds']:.1f} | "
              f"{row['rows_per_s']:,.0f} |")
        if abs(row["maxrss_peak_kib"] - row["hwm_peak_kib"]) > 0.01 * row["hwm_peak_kib"]:
            print(f"warning: N={row['rows']:,}: ru_maxrss and VmHWM differ; ru_maxrss may hold "
                  "the parent's high-water mark", file=sys.stderr)
    if len(results) > 1:
        small = min(results, key=lambda r: r["rows"])
        large = max(results, key=lambda r: r["rows"])
        ratio = large["maxrss_peak_kib"] / small["maxrss_peak_kib"]
        hwm_ratio = large["hwm_peak_kib"] / small["hwm_peak_kib"]
        growth_small = small["maxrss_peak_kib"] - small["maxrss_before_kib"]
        growth_large = large["maxrss_peak_kib"] - large["maxrss_before_kib"]
        verdict = "within" if abs(ratio - 1) < 0.10 else "NOT within"
        print(f"\npeak RSS at N={large['rows']:,} / at N={small['rows']:,}: {ratio:.3f} "
              f"({verdict} the 10% target; VmHWM {hwm_ratio:.3f}); growth over the baseline "
              f"{growth_large / 1024:.1f} vs {growth_small / 1024:.1f} MiB")

if __name__ == "__main__":
    main()
