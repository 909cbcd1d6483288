"""Ahead-of-time compiles of every kernel and launch candidate for NVIDIA architectures,
checked against each architecture's limits without a GPU.

For each kernel, with the block sizes :func:`pick_blocks` gives on CUDA (and, for the hot ops,
every :func:`candidate_blocks` configuration the autotuner may pick), Triton lowers the kernel
for the target; ``ptxas -v`` then reports registers and spills, and Triton the shared memory.
A kernel fails the check when it does not compile, spills registers, needs more registers per
block than an SM holds, or more shared memory than one block may have on that architecture.

    python -m fma_fast.kernels.aot                       # sm_80, sm_89, sm_90: a table
    python -m fma_fast.kernels.aot --arch 75 --json      # one JSON line per compile

Needs triton (with its bundled ptxas) and no GPU; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from ._common import Blocks, interpreter_active
from ._common import candidate_blocks as _candidate_blocks
from ._common import pick_blocks as _pick_blocks


@dataclass(frozen=True)
class Arch:
    """Per-block limits of one architecture (CUDA programming guide, compute capabilities)."""

    name: str
    gpus: str
    shared_bytes: int  # dynamic shared memory one block may opt in to
    registers_per_block: int = 65536


ARCHS = {
    75: Arch("sm_75", "T4, RTX 20xx", 65536),
    80: Arch("sm_80", "A100, A30", 166912),
    86: Arch("sm_86", "A10, A40, RTX 30xx", 101376),
    89: Arch("sm_89", "L4, L40, RTX 40xx", 101376),
    90: Arch("sm_90", "H100, H200", 232448),
}
CHECKED_ARCHS = (80, 89, 90)
"""The architectures every kernel must fit (``tests/test_kernels_dispatch.py``)."""

KNOWN_LIMITS = {
    "folded_block[fp32,W=1024]": (3, 8),
    "folded_block[bf16,W=1024]": (3, 8),
}
"""Compiles that spill registers before a triton version, whatever the blocks: triton 3.6
cannot keep the fused residual block's (rows × 1024) accumulator in registers (D = 768 and
1024, e.g. ViT-L/14 and RN50). Those launches run correctly, only slower; 3.8 fits them."""

FLOAT_ARGS = {"scale", "gamma", "t_lo", "t_hi", "grad_scale", "h", "eps"}
INT64_ARGS = {"seed", "numel", "stride_s"}
SHAPES = {"rows": 4096, "classes": 1000, "dim": 512}


@dataclass(frozen=True)
class Job:
    name: str
    module: str
    kernel: str
    pointers: dict[str, str]
    constexprs: dict[str, object]
    blocks: Blocks


def _jobs(arch: int) -> list[Job]:
    """Every kernel at the issue-4 scale with the blocks chosen for ``arch``, in fp32 and
    bf16, with every launch candidate of the hot ops (duplicates dropped)."""

    def pick_blocks(*args, **kwargs) -> Blocks:
        return _pick_blocks(*args, **kwargs, arch=arch)

    def candidate_blocks(*args, **kwargs) -> list[Blocks]:
        return _candidate_blocks(*args, **kwargs, arch=arch)

    n, c, d = SHAPES["rows"], SHAPES["classes"], SHAPES["dim"]
    jobs: list[Job] = []
    for io, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        precision = "tf32x3" if io == "fp32" else "tf32"
        scoring = dict(x_ptr=io, z_ptr=io, val_ptr="fp32", idx_ptr="i64", lse_ptr="fp32",
                       inv_norm_ptr="fp32", lab_ptr="i64", loss_ptr="fp32", cos_y_ptr="fp32",
                       grad_out_ptr="fp32", dx_ptr=io)
        for rows in (n, 10**6, 100):  # the full 64-row tile, and the small tiles of small N
            for b in candidate_blocks("cosine_topk", rows, d, c, dtype):
                jobs.append(Job(f"cosine_topk[{io},N={rows}]", "cosine_topk",
                                "_cosine_topk_kernel", scoring,
                                dict(K=5, K_PAD=8, BLOCK_N=b.block_n, BLOCK_C=b.block_c,
                                     BLOCK_D=b.block_d, PRECISION=precision), b))
        b = pick_blocks("cosine_ce_backward", n, d, c, dtype)
        jobs.append(Job(f"cosine_ce_backward[{io}]", "cosine_cross_entropy", "_backward_kernel",
                        scoring, dict(BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d,
                                      PRECISION=precision), b))
        b = pick_blocks("euler", n * d, 1)
        jobs.append(Job(f"euler[{io}]", "euler", "_euler_kernel",
                        dict(x_ptr="fp32", v_ptr=io, out_ptr=io, t_ptr="fp32", t_out_ptr="fp32"),
                        dict(BLOCK=b.block_n), b))
        f = pick_blocks("flow_matching", 32, d)
        pair = dict(x0_ptr=io, z_ptr="fp32", t_ptr="fp32", lab_ptr="i64", std_ptr="fp32",
                    out_ptr=io, pred_ptr=io, row_loss_ptr="fp32", grad_ptr="fp32")
        tiles = dict(BLOCK_N=f.block_n, BLOCK_D=f.block_d)
        for form in (0, 1):
            jobs.append(Job(f"flow_loss[{io},form={form}]", "flow_matching", "_loss_kernel",
                            pair, dict(FORM=form, WRITE_GRAD=True, **tiles), f))
            jobs.append(Job(f"flow_pair[{io},form={form}]", "flow_matching", "_pair_kernel",
                            pair, dict(FORM=form, **tiles), f))
        for width in (d, 1024):
            for b in candidate_blocks("folded_block", n, width, dtype=dtype):
                jobs.append(Job(f"folded_block[{io},W={width}]", "folded_step",
                                "_residual_block_kernel",
                                dict(h_ptr="fp32", out_ptr="fp32", w1_ptr=io, b1_ptr=io,
                                     w2_ptr=io, b2_ptr=io),
                                dict(BLOCK_M=b.block_n, BLOCK_K=b.block_d, BLOCK_H=b.block_c,
                                     WIDTH_PAD=width, PRECISION=precision), b))
        for b in candidate_blocks("folded_final", n, d, d, dtype):
            jobs.append(Job(f"folded_final[{io}]", "folded_step", "_final_euler_kernel",
                            dict(h_ptr="fp32", x_ptr="fp32", out_ptr="fp32", wf_ptr=io,
                                 bf_ptr=io),
                            dict(BLOCK_M=b.block_n, BLOCK_K=b.block_d, BLOCK_D=b.block_c,
                                 PRECISION=precision), b))
        b = pick_blocks("cosine_topk", n, d, c, dtype)
        score_tiles = dict(BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d,
                           PRECISION=precision)
        jobs.append(Job(f"cosine_lse[{io}]", "step_ensemble", "_cosine_lse_kernel", scoring,
                        score_tiles, b))
        jobs.append(Job(f"ensemble_topk[{io}]", "step_ensemble", "_ensemble_topk_kernel",
                        scoring, dict(K=16, K_PAD=16, **score_tiles), b))
        jobs.append(Job(f"cosine_ce_forward[{io}]", "cosine_cross_entropy", "_forward_kernel",
                        scoring, score_tiles, b))
    b = pick_blocks("noise", 32, d)
    jobs.append(Job("noise", "flow_matching", "_noise_kernel", dict(out_ptr="fp32"),
                    dict(BLOCK_N=b.block_n, BLOCK_D=b.block_d), b))
    unique: dict[tuple, Job] = {}
    for job in jobs:
        key = (job.module, job.kernel, tuple(sorted(job.pointers.items())),
               tuple(sorted(job.constexprs.items())), job.blocks)
        unique.setdefault(key, job)
    return list(unique.values())


def _signature(kernel, job: Job) -> dict[str, str]:
    signature = {}
    for arg in kernel.arg_names:
        if arg in job.constexprs:
            signature[arg] = "constexpr"
        elif arg in job.pointers:
            signature[arg] = "*" + job.pointers[arg]
        else:
            signature[arg] = "fp32" if arg in FLOAT_ARGS else "i64" if arg in INT64_ARGS else "i32"
    return signature


def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(job: Job, arch: int, stem: str) -> dict:
    """Compile ``job`` for ``arch`` (PTX and cubin at ``stem``.*) and check it against the
    arch's limits."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": job.name, "arch": ARCHS[arch].name,
           "blocks": f"{job.blocks.block_n}x{job.blocks.block_c}x{job.blocks.block_d}"
                     f"/w{job.blocks.num_warps}/s{job.blocks.num_stages}"}
    kernel = getattr(importlib.import_module(f"fma_fast.kernels.{job.module}"), job.kernel)
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=_signature(kernel, job), constexprs=job.constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": job.blocks.num_warps, "num_stages": job.blocks.num_stages},
        )
    except Exception as error:  # what a user's GPU would hit: reported, then the fallback
        lines = str(error).strip().splitlines() or [""]
        return {**row, "ok": False, "problem": f"{type(error).__name__}: {lines[-1][:200]}"}
    path = f"{stem}.ptx"
    with open(path, "w") as handle:
        handle.write(compiled.asm["ptx"])
    target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    report = subprocess.run([_ptxas(), f"-arch={target}", "-v", path, "-o", path + ".cubin"],
                            capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not (registers and spills):
        return {**row, "ok": False, "problem": f"ptxas: {report.strip()[-200:]}"}
    threads = 32 * job.blocks.num_warps
    row.update(registers=int(registers.group(1)),
               spill_bytes=int(spills.group(1)) + int(spills.group(2)),
               shared_bytes=int(compiled.metadata.shared),
               shared_limit=ARCHS[arch].shared_bytes)
    problems = []
    if row["spill_bytes"] and _triton_version() < KNOWN_LIMITS.get(job.name, (0, 0)):
        row["known"] = f"spills before triton {'.'.join(map(str, KNOWN_LIMITS[job.name]))}"
    elif row["spill_bytes"]:
        problems.append(f"{row['spill_bytes']} bytes of register spills")
    if row["registers"] * threads > ARCHS[arch].registers_per_block:
        problems.append(f"{row['registers']} registers x {threads} threads exceed an SM")
    if row["shared_bytes"] > row["shared_limit"]:
        problems.append(f"{row['shared_bytes']} bytes of shared memory > {row['shared_limit']}")
    return {**row, "ok": not problems, "problem": "; ".join(problems)}


def _work(task: tuple[int, int]) -> dict:
    index, arch = task
    return compile_one(_JOBS[arch][index], arch, os.path.join(_FOLDER, f"{index}-sm{arch}"))


_JOBS: dict[int, list[Job]] = {}
_FOLDER = ""


def compile_all(archs=CHECKED_ARCHS, processes: int | None = None) -> list[dict]:
    """Every job for every arch in ``archs``, compiled in ``processes`` forked workers."""
    global _JOBS, _FOLDER
    if interpreter_active():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    unknown = [arch for arch in archs if arch not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; known: {sorted(ARCHS)}")
    _JOBS = {arch: _jobs(arch) for arch in archs}
    with tempfile.TemporaryDirectory() as folder:
        _FOLDER = folder
        tasks = [(i, arch) for arch in archs for i in range(len(_JOBS[arch]))]
        with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
            return pool.map(_work, tasks)


def markdown(rows: list[dict]) -> str:
    """The compiles as a table: kernel × arch with registers, spills and shared memory."""
    lines = ["| kernel | blocks (n×c×d/warps/stages) | arch | registers | spills (B) | "
             "shared (B) / limit | ok |", "|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        if "registers" in row:
            numbers = (f"{row['registers']} | {row['spill_bytes']} | "
                       f"{row['shared_bytes']:,} / {row['shared_limit']:,}")
        else:
            numbers = "- | - | -"
        verdict = "yes" if row["ok"] else f"**no**: {row['problem']}"
        if row.get("known"):
            verdict = f"yes, but {row['known']} (known)"
        lines.append(f"| {row['kernel']} | {row['blocks']} | {row['arch']} | {numbers} | "
                     f"{verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(CHECKED_ARCHS),
                        help=f"compute capabilities ({', '.join(map(str, ARCHS))}); "
                             "default %(default)s")
    parser.add_argument("--json", action="store_true", help="one JSON object per compile")
    parser.add_argument("--processes", type=int, default=None, help="default: all CPUs")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, args.processes)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(markdown(rows))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
