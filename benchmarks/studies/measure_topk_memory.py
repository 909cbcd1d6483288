"""Peak extra memory of top-k scoring: fused Triton kernel, the reference, and ``solve`` itself.

    python benchmarks/studies/measure_topk_memory.py            # N=4096, C=50,000, D=512, k=5
    python benchmarks/studies/measure_topk_memory.py --backends triton-interpreter \
        --rows 16 --dim 16
    python benchmarks/studies/measure_topk_memory.py --backends solve select_steps --classes 200000

Each backend runs in its own child process so peaks do not mix. On CUDA the peak is
torch.cuda.max_memory_allocated above what the inputs already hold (after one warm-up call);
on the CPU it is the rise of the process's resident-set high-water mark (ru_maxrss) over the
first call, which counts torch and numpy allocations alike (so it is coarse: a few MiB of
allocator noise). The class table is normalised before measuring (an O(C·D) copy a solver
makes once), so the numbers are what scoring adds: O(N·k) for the fused path, N×C for the
reference. The interpreter path is the Triton kernel emulated in numpy: correct but slow, so
give it few rows. ``select_steps`` scores accuracy and the cross-entropy at M=0 and M=1 (its
rows are labelled at random), with the same model and table as ``solve``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BACKENDS = ("triton", "triton-interpreter", "reference", "solve", "select_steps")


def child(args: argparse.Namespace) -> dict:
    """Measure one backend in this process and return the numbers."""
    if args.child == "triton-interpreter":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from fma_fast.ops import dispatch

    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.rows, args.dim, device=device, generator=generator)
    # Normalised in place: a temporary here would raise the high-water mark above what
    # scoring adds and hide it from the ru_maxrss measurement.
    table = torch.randn(args.classes, args.dim, device=device, generator=generator)
    table.div_(torch.linalg.vector_norm(table, dim=-1, keepdim=True))
    backend = "reference" if args.child == "reference" else "triton"
    if args.child == "solve":  # the public entry point, as a user calls it (one Euler step)
        import fma_fast

        model = fma_fast.VelocityNet(args.dim, blocks=2).to(device)

        def score():
            return fma_fast.solve(x, model, 1, class_features=table, topk=args.k)
    elif args.child == "select_steps":  # accuracy and cross-entropy at M=0 and M=1
        import fma_fast

        model = fma_fast.VelocityNet(args.dim, blocks=2).to(device)
        labels = torch.randint(args.classes, (args.rows,), device=device, generator=generator)

        def score():
            choice = fma_fast.select_steps(model, x, labels, table, max_steps=1)
            return argparse.Namespace(path=f"select_steps (best M={choice.best_steps})")
    else:

        def score():
            return dispatch.cosine_topk(x, table, args.k, normalized=True, backend=backend)

    if device.type == "cuda":
        score()  # compile and warm up outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = score()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        result = score()
        seconds = time.perf_counter() - start
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        method = "ru_maxrss rise (first call)"
    return {
        "backend": args.child, "path": result.path, "device": str(device),
        "rows": args.rows, "classes": args.classes, "dim": args.dim, "k": args.k,
        "extra_bytes": int(extra), "seconds": seconds, "method": method,
        "rows_x_classes_fp32_bytes": 4 * args.rows * args.classes,
        "rows_x_k_output_bytes": 12 * args.rows * args.k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="default: triton and reference on CUDA, reference on the CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON line per backend")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args)))
        return
    backends = args.backends or (["triton", "reference", "solve"] if args.device == "cuda"
                                 else ["reference", "solve"])
    mib = 1024 * 1024
    for backend in backends:
        command = [sys.executable, __file__, "--child", backend, "--device", args.device,
                   "--rows", str(args.rows), "--classes", str(args.classes),
                   "--dim", str(args.dim), "--k", str(args.k)]
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{backend}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(done.stdout.splitlines()[-1])
        if args.json:
            print(json.dumps(row))
            continue
        print(f"{backend:>18} (path {row['path']}, {row['device']}): N={row['rows']} "
              f"C={row['classes']} D={row['dim']} k={row['k']}: extra "
              f"{row['extra_bytes'] / mib:9.2f} MiB  [N×C fp32 would be "
              f"{row['rows_x_classes_fp32_bytes'] / mib:.1f} MiB, (N, k) outputs "
              f"{row['rows_x_k_output_bytes'] / 1024:.1f} KiB]  {row['seconds']:.2f} s  "
              f"({row['method']})")


if __name__ == "__main__":
    main()
