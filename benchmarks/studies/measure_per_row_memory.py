"""Peak memory of a solve against per-row class tables (CoCoOp) built batch by batch.

The tables of all rows would be N·C·D·4 bytes (8 GiB at N=4096, C=1000, D=512); the solve
holds one row batch's block (``policy.PER_ROW_TABLE_BYTES``) and its normalised copy at most.
Each size runs in a fresh process, so ru_maxrss is its own.

    python benchmarks/studies/measure_per_row_memory.py --rows 4096 --classes 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(rows: int, classes: int, dim: int) -> dict:
    import torch

    import fma_fast
    from fma_fast.core.policy import PER_ROW_TABLE_BYTES

    torch.manual_seed(0)
    model = fma_fast.VelocityNet(dim, blocks=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.03)
    x = torch.nn.functional.normalize(torch.randn(rows, dim), dim=-1)
    calls = []

    def build(x0):
        calls.append(x0.shape[0])
        generator = torch.Generator().manual_seed(len(calls))
        return torch.randn(x0.shape[0], classes, dim, generator=generator)

    tables = fma_fast.PerRowClasses(build=build, num_classes=classes, dim=dim)
    fma_fast.solve(x[:8], model, 2, class_features=tables, topk=5)  # warm-up, small
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fma_fast.solve(x, model, 2, class_features=tables, topk=5)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "classes": classes, "dim": dim, "batch_rows": max(calls),
            "block_mib": round(max(calls) * classes * dim * 4 / 2**20, 1),
            "budget_mib": PER_ROW_TABLE_BYTES / 2**20,
            "all_tables_mib": round(rows * classes * dim * 4 / 2**20, 1),
            "rss_before_mib": round(before / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
            "rise_mib": round((peak - before) / 1024, 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.rows[0], args.classes, args.dim)))
        return
    print("| rows | C | D | batch rows | block MiB | all tables MiB | RSS before | peak | "
          "rise MiB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        done = subprocess.run([sys.executable, __file__, "--child", "--rows", str(rows),
                               "--classes", str(args.classes), "--dim", str(args.dim)],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {r['rows']} | {r['classes']} | {r['dim']} | {r['batch_rows']} | "
              f"{r['block_mib']} | {r['all_tables_mib']} | {r['rss_before_mib']} | "
              f"{r['rss_peak_mib']} | {r['rise_mib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
