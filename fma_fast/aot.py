"""Ahead-of-time compiles of every kernel and launch candidate for NVIDIA architectures,
checked against each architecture's limits without a GPU.

The real launch paths (dispatch's ops, the folded solve step on a real plan) run on CPU tensors
at the issue-4 scale with the block sizes :func:`pick_blocks` gives on CUDA (and, for the hot
ops, every :func:`candidate_blocks` configuration the autotuner may pick); each launch goes
through Triton's own binder, as on a GPU of the target architecture, so it is compiled with the
specialisation a real launch gets (dtypes, value-1 and divisible-by-16 integers, aligned
pointers), then lowered for the target; ``ptxas -v`` reports registers and spills, and Triton
the shared memory.
A kernel fails the check when it does not compile, spills registers (beyond
:data:`SMALL_SPILL_BYTES` below the register limit, which ptxas chooses itself), needs more
registers per block than an SM holds, or more shared memory than one block may have on that
architecture.

    python -m fma_fast.aot                       # sm_80, sm_89, sm_90: a table
    python -m fma_fast.aot --arch 75 --json      # one JSON line per compile

Needs triton (with its bundled ptxas) and no GPU; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .kernels._common import DEFAULT_DOT_PRECISION, Blocks, interpreter_active
from .kernels._common import candidate_blocks as _candidate_blocks


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

MAX_REGISTERS = 255
"""Registers one thread may use on every checked architecture."""

SMALL_SPILL_BYTES = 64
"""A spill of at most this many bytes per thread at fewer registers than the limit is ptxas
trading a few L1-cached local accesses for occupancy (it stops at 56, 64 or 128 registers
though more were allowed; the other triton version's ptxas often fits the same tile without
one): listed, not failed. Anything larger, or any spill at the limit, fails the check."""

SHAPES = {"rows": 4096, "classes": 1000, "dim": 512}
SCORING_ROWS = (8192, 4096, 100)
"""Rows of the scoring launches: 64-row tiles (any N from 4,224 up, e.g. 10⁶), 32 and 16."""

OPS = {"_cosine_topk_kernel": "cosine_topk", "_cosine_lse_kernel": "cosine_lse",
       "_ensemble_topk_kernel": "ensemble_topk", "_forward_kernel": "cosine_ce_forward",
       "_backward_kernel": "cosine_ce_backward", "_euler_kernel": "euler",
       "_pair_kernel": "flow_pair", "_loss_kernel": "flow_loss", "_noise_kernel": "noise",
       "_residual_block_kernel": "folded_block", "_final_euler_kernel": "folded_final"}


@dataclass(frozen=True)
class Job:
    """One launch as Triton would compile it: the specialisation its binder derived from the
    launcher's real arguments (dtypes, value-1 and divisible-by-16 ints, 16-byte-aligned
    pointers) and its options."""

    name: str
    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's parsed options (num_warps, num_stages, arch, ...)

    @property
    def blocks(self) -> str:
        """Tile rows × columns × K chunk / warps / stages, as ``pick_blocks`` names them."""
        named = {self.kernel.arg_names[path[0]]: value
                 for path, value in self.constexprs.items() if len(path) == 1}
        rows = named.get("BLOCK_N", named.get("BLOCK_M", named.get("BLOCK", 1)))
        if "BLOCK_K" in named:
            cols, inner = named.get("BLOCK_H", named.get("BLOCK_D", 1)), named["BLOCK_K"]
        else:
            cols, inner = named.get("BLOCK_C", 1), named.get("BLOCK_D", 1)
        return f"{rows}x{cols}x{inner}/w{self.options.num_warps}/s{self.options.num_stages}"


class _Target:
    """A stand-in for Triton's GPU driver: the current device is an ``arch`` GPU, so a launch
    runs Triton's own binder (the real specialisation) but compiles nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def recording(arch: int) -> Iterator[list[tuple]]:
    """Within the block, every ``kernel[grid](...)`` launch is specialised by Triton exactly as
    on an ``arch`` GPU and recorded as (kernel, Triton's cache key, signature, constexprs,
    attrs, options) instead of compiled and run; the launchers pick their blocks for ``arch``
    and dispatch takes the kernel path for CPU tensors (their allocations are 64-byte aligned,
    CUDA's 256: both divisible by 16, as Triton's pointer specialisation asks)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from fma_fast.ops import dispatch

    from .kernels import _common

    launches: list[tuple] = []

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        launches.append((self, key, signature, constexprs, attrs, options))

    modules = [_common] + [importlib.import_module(f"fma_fast.kernels.{name}")
                           for name in KERNEL_MODULES]
    patched = [(m, m.device_arch) for m in modules if hasattr(m, "device_arch")]
    real_compile, real_select = JITFunction._do_compile, dispatch.select_path
    dispatch.select_path = lambda backend, *tensors: dispatch.PATH_TRITON  # CPU tensors
    driver.set_active(_Target(arch))
    JITFunction._do_compile = do_compile
    for module, _ in patched:
        module.device_arch = lambda device: arch
    try:
        yield launches
    finally:
        JITFunction._do_compile, dispatch.select_path = real_compile, real_select
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)
        for module, real in patched:
            module.device_arch = real
        for kernel in {launch[0] for launch in launches}:
            kernel.device_caches.clear()


KERNEL_MODULES = ("cosine_topk", "cosine_cross_entropy", "step_ensemble", "euler",
                  "flow_matching", "folded_step")


@contextlib.contextmanager
def _forced_blocks(module_name: str, op: str, blocks: Blocks | None) -> Iterator[None]:
    """The launches of ``op`` in ``module_name`` use ``blocks`` (an autotune candidate), when
    given, instead of the tuner's choice."""
    module = importlib.import_module(f"fma_fast.kernels.{module_name}")
    real = module.tuned_blocks

    def forced(name, *args, **kwargs):
        return blocks if name == op else real(name, *args, **kwargs)

    if blocks is not None:
        module.tuned_blocks = forced
    try:
        yield
    finally:
        module.tuned_blocks = real


def _scenarios(arch: int) -> list[tuple[str, object]]:
    """(label suffix, call) pairs that run the real launch paths at the issue-4 scale in fp32
    and bf16: dispatch's ops (as a solve or fit calls them) and the folded solve step
    (``fused._run_step`` on a real plan), every autotune candidate of the hot ops."""
    from fma_fast.core.model import VelocityNet
    from fma_fast.ops import dispatch
    from fma_fast.solver import fused
    from fma_fast.solver.plan import solver_plan

    n, c, d = SHAPES["rows"], SHAPES["classes"], SHAPES["dim"]
    calls: list[tuple[str, object]] = []
    for io, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        def features(rows, dtype=dtype):
            return torch.randn(rows, d).to(dtype)

        table = torch.nn.functional.normalize(torch.randn(c, d), dim=-1).to(dtype)
        labels = torch.randint(c, (n,))
        for rows in SCORING_ROWS:
            for b in _candidate_blocks("cosine_topk", rows, d, c, dtype, arch=arch):
                def topk(rows=rows, b=b, table=table, features=features):
                    with _forced_blocks("cosine_topk", "cosine_topk", b):
                        dispatch.cosine_topk(features(rows), table, 5, normalized=True,
                                             backend="triton")
                calls.append((f"{io},N={rows}", topk))
        calls.append((io, lambda table=table, features=features: dispatch.step_ensemble_topk(
            features(n).unsqueeze(0).expand(3, n, d), table, 16, normalized=True,
            backend="triton")))

        def cross_entropy(table=table, labels=labels, features=features):
            x = features(n).requires_grad_()
            dispatch.cosine_cross_entropy(x, table, labels, normalized=True,
                                          backend="triton").loss.backward()
        calls.append((io, cross_entropy))
        calls.append((io, lambda dtype=dtype: dispatch.euler_step(
            torch.randn(n, d), torch.randn(n, d).to(dtype), torch.zeros(()), 0.1,
            backend="triton")))
        for form in ("bridge", "endpoint"):  # fit: fp32 features, the prediction in autocast's
            def pair(form=form, dtype=dtype, labels=labels):
                x0, z, t = torch.randn(n, d), torch.randn(c, d), torch.rand(n)
                options = dict(seed=12345, gamma=0.5, form=form, feature_std=x0.std(dim=0),
                               backend="triton")
                dispatch.fused_pair(x0, labels, z, t, **options)
                dispatch.fused_loss(torch.randn(n, d).to(dtype), x0, labels, z, t, **options)
            calls.append((f"{io},form={form}", pair))
        for width in (d, 1024):
            model = VelocityNet(d, blocks=1, width=width)
            plan = solver_plan(model, 1, dtype=dtype, device="cpu")
            for op in ("folded_block", "folded_final"):
                shape = (n, width, 1) if op == "folded_block" else (n, width, d)
                for b in [None, *_candidate_blocks(op, *shape, dtype, arch=arch)[1:]]:
                    def step(plan=plan, b=b, width=width, op=op):
                        state = torch.randn(n, d)
                        hidden = torch.empty(n, width)
                        with _forced_blocks("folded_step", op, b):
                            fused._run_step(plan, 0, state, hidden,
                                                     DEFAULT_DOT_PRECISION)
                    calls.append((f"{io},W={width}", step))
    calls.append(("", lambda: dispatch.flow_matching_noise(12345, 32, d, backend="triton")))
    return calls


def _jobs(arch: int) -> list[Job]:
    """Every launch of :func:`_scenarios` for ``arch``, one per Triton specialisation."""

    torch.manual_seed(0)
    jobs: dict[tuple, Job] = {}
    for suffix, call in _scenarios(arch):
        with recording(arch) as launches, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        for kernel, key, signature, constexprs, attrs, options in launches:
            op = OPS[kernel.fn.__name__]
            name = f"{op}[{suffix}]" if suffix else op
            jobs.setdefault((kernel.fn.__name__, key),
                            Job(name, kernel, signature, constexprs, attrs, options))
    return list(jobs.values())


def compile_one(job: Job, arch: int) -> dict:
    """Compile ``job`` for ``arch`` as its launch would and check it against the arch's limits
    (registers and spills from the ``ptxas -v`` log of Triton's own compile: its flags)."""
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": job.name, "arch": ARCHS[arch].name, "blocks": job.blocks}
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # log, no cache
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=job.kernel, signature=job.signature, constexprs=job.constexprs,
                          attrs=job.attrs),
                target=GPUTarget("cuda", arch, 32), options=job.options.__dict__)
    except Exception as error:  # what a user's GPU would hit: reported, then the fallback
        lines = str(error).strip().splitlines() or [""]
        return {**row, "ok": False, "problem": f"{type(error).__name__}: {lines[-1][:200]}"}
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    report = log.getvalue()
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not (registers and spills):
        return {**row, "ok": False, "problem": f"ptxas: {report.strip()[-200:]}"}
    threads = 32 * job.options.num_warps
    row.update(registers=int(registers.group(1)),
               spill_bytes=int(spills.group(1)) + int(spills.group(2)),
               shared_bytes=int(compiled.metadata.shared),
               shared_limit=ARCHS[arch].shared_bytes)
    problems = []
    limit = min(MAX_REGISTERS, ARCHS[arch].registers_per_block // threads)
    if 0 < row["spill_bytes"] <= SMALL_SPILL_BYTES and row["registers"] < limit:
        row["known"] = (f"ptxas spills {row['spill_bytes']} B at {row['registers']} of "
                        f"{limit} registers (its choice)")
    elif row["spill_bytes"]:
        problems.append(f"{row['spill_bytes']} bytes of register spills at "
                        f"{row['registers']} of {limit} registers")
    if row["registers"] * threads > ARCHS[arch].registers_per_block:
        problems.append(f"{row['registers']} registers x {threads} threads exceed an SM")
    if row["shared_bytes"] > row["shared_limit"]:
        problems.append(f"{row['shared_bytes']} bytes of shared memory > {row['shared_limit']}")
    return {**row, "ok": not problems, "problem": "; ".join(problems)}


def _work(task: tuple[int, int]) -> dict:
    index, arch = task
    return compile_one(_JOBS[arch][index], arch)


_JOBS: dict[int, list[Job]] = {}


def compile_all(archs=CHECKED_ARCHS, processes: int | None = None) -> list[dict]:
    """Every job for every arch in ``archs``, compiled in ``processes`` forked workers."""
    global _JOBS
    if interpreter_active():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    unknown = [arch for arch in archs if arch not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; known: {sorted(ARCHS)}")
    _JOBS = {arch: _jobs(arch) for arch in archs}
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
            verdict = f"yes, but {row['known']}"
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
