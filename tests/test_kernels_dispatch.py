"""Routing (which path runs and why), import without triton, and Hopper compilation of kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fma_fast import dispatch, reference
from fma_fast.kernels._common import HAS_TRITON
from fma_fast.kernels.testing import SKIP_REASON, assert_close, kernel_device

DEVICE = kernel_device()


def run_python(code: str, env_changes: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_backend_argument_is_checked():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.select_path("cuda", x)
    assert dispatch.select_path("reference", x) == "reference"


@pytest.mark.skipif(DEVICE != "cpu", reason="SKIPPED, not passed: needs the interpreter on CPU")
def test_interpreter_routing_on_cpu():
    x = torch.zeros(2, 3)
    assert dispatch.select_path("auto", x) == "triton-interpreter"
    assert dispatch.select_path("auto", x.bfloat16()) == "reference"
    with pytest.raises(RuntimeError, match="does not support bfloat16"):
        dispatch.select_path("triton", x.bfloat16())


def test_reference_backend_results_and_paths():
    g = torch.Generator().manual_seed(0)
    x, table = torch.randn(6, 9, generator=g), torch.randn(4, 9, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    top = dispatch.cosine_topk(x, table, 2, logit_scale=10.0, backend="reference")
    ref_values, ref_indices = reference.cosine_topk(x, table, 2)
    assert top.path == "reference" and torch.equal(top.indices, ref_indices)
    assert_close(top.values, 10.0 * ref_values, "scaled reference top-k")
    ce = dispatch.cosine_cross_entropy(x, table, labels, backend="reference")
    assert ce.path == "reference"
    assert torch.equal(ce.loss, reference.cosine_cross_entropy(x, table, labels))
    ens = dispatch.step_ensemble_topk([x, 2 * x], table, 4, backend="reference")
    assert ens.path == "reference"
    assert_close(ens.values.sum(1), torch.full((6,), 2.0), "ensemble probabilities sum to S")
    t = torch.zeros(())
    step = dispatch.euler_step(x, table[labels], t, 0.1, inplace=True, backend="reference")
    assert step.path == "reference" and step.x is x and float(t) == float(torch.tensor(0.1))


def test_argument_errors_name_the_problem():
    x, table = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="k must be an int in"):
        dispatch.cosine_topk(x, table, 6)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        dispatch.cosine_topk(x, table, 1, logit_scale=-1.0)
    with pytest.raises(ValueError, match="x has dim 4 but class_features 3"):
        dispatch.cosine_topk(x, table[:, :3], 1)
    with pytest.raises(ValueError, match="pred must match x0"):
        dispatch.fused_loss(torch.zeros(3, 5), x, torch.zeros(3, dtype=torch.long), table,
                            torch.rand(3), seed=0, gamma=0.0)
    with pytest.raises(ValueError, match="states must be"):
        dispatch.step_ensemble_topk(x, table)


def test_without_interpreter_cpu_goes_to_reference():
    """A fresh process without TRITON_INTERPRET and without CUDA: auto = reference."""
    result = run_python("""
        import torch
        from fma_fast import dispatch
        x = torch.randn(3, 4)
        print(dispatch.cosine_topk(x, torch.randn(5, 4), 2).path)
        try:
            dispatch.cosine_topk(x, torch.randn(5, 4), 2, backend="triton")
        except RuntimeError as error:
            print(error)
    """, {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "reference", result.stdout
    assert "cannot run" in lines[1], result.stdout


def test_import_and_reference_paths_work_without_triton():
    result = run_python("""
        import sys
        sys.modules["triton"] = None  # any "import triton" now raises ImportError
        import torch
        import fma_fast
        from fma_fast import dispatch
        from fma_fast.kernels import _common
        assert not _common.HAS_TRITON
        x, z = torch.randn(3, 4), torch.randn(5, 4)
        print(dispatch.cosine_topk(x, z, 2).path)
        print(dispatch.fused_pair(x, torch.tensor([0, 1, 4]), z, torch.rand(3), seed=1,
                                  gamma=0.5).path)
        try:
            dispatch.euler_step(x, x, torch.zeros(()), 0.1, backend="triton")
        except RuntimeError as error:
            print(error)
    """, {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "reference", "reference",
        "backend='triton' requested but the kernels cannot run: triton is not installed"]


# Every kernel, compiled ahead of time for an H100 (sm_90) with the block sizes pick_blocks
# gives on CUDA, and the hot ops with every autotune candidate (candidate_blocks): proves the
# kernels lower through Triton's GPU pipeline (tl.dot precisions, while loops, int64 offsets,
# half dtypes) on machines without a GPU, and, read back from the PTX with ptxas -v, that those
# block sizes spill no registers. It does not run them.
COMPILE_SCRIPT = """
import json, multiprocessing, os, re, subprocess, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fma_fast.kernels import cosine_cross_entropy, cosine_topk, euler, flow_matching
from fma_fast.kernels import folded_step, step_ensemble
from fma_fast.kernels._common import candidate_blocks, pick_blocks

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
FLOATS = {"scale", "gamma", "t_lo", "t_hi", "grad_scale", "h", "eps"}
INT64 = {"seed", "numel", "stride_s"}
TMP = tempfile.mkdtemp()

def compile_job(index):
    name, kernel, pointers, constexprs, blocks = jobs[index]
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
        else:
            signature[arg] = "fp32" if arg in FLOATS else "i64" if arg in INT64 else "i32"
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages})
    except Exception as error:
        return name, f"{type(error).__name__}: {str(error)[-400:]}", {}
    path = os.path.join(TMP, f"{index}.ptx")
    with open(path, "w") as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                            capture_output=True, text=True).stderr
    regs = re.search(r"Used (\\d+) registers", report)
    spills = re.search(r"(\\d+) bytes spill stores", report)
    stats = ({"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)),
              "shared": compiled.metadata.shared} if regs and spills
             else {"ptxas": report[-300:]})
    return name, "ok", stats

jobs = []
N, C, D = 4096, 1000, 512
for io, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    # bf16 for the kernels whose code changes with the dtype (tensor-core dot of halves,
    # mixed-dtype loads and stores); the rest share dot_tile / _pair_tile with those.
    precision = "tf32x3" if io == "fp32" else "tf32"
    b = pick_blocks("cosine_topk", N, D, C, dtype)
    tiles = dict(BLOCK_N=b.block_n, BLOCK_C=b.block_c, BLOCK_D=b.block_d, PRECISION=precision)
    scoring = dict(x_ptr=io, z_ptr=io, val_ptr="fp32", idx_ptr="i64", lse_ptr="fp32",
                   inv_norm_ptr="fp32", lab_ptr="i64", loss_ptr="fp32", cos_y_ptr="fp32",
                   grad_out_ptr="fp32", dx_ptr=io)
    for rows in (N, 10**6, 100):  # the full 64-row tile, and the 16-row tile of tiny N
        for bn in candidate_blocks("cosine_topk", rows, D, C, dtype):  # pick_blocks' first
            jobs.append((f"cosine_topk[{io},N={rows},{bn}]", cosine_topk._cosine_topk_kernel,
                         scoring, dict(K=5, K_PAD=8, BLOCK_N=bn.block_n, BLOCK_C=bn.block_c,
                                       BLOCK_D=bn.block_d, PRECISION=precision), bn))
    bb = pick_blocks("cosine_ce_backward", N, D, C, dtype)
    jobs.append((f"cosine_ce_backward[{io}]", cosine_cross_entropy._backward_kernel, scoring,
                 dict(BLOCK_N=bb.block_n, BLOCK_C=bb.block_c, BLOCK_D=bb.block_d,
                      PRECISION=precision), bb))
    jobs.append((f"euler[{io}]", euler._euler_kernel,
                 dict(x_ptr="fp32", v_ptr=io, out_ptr=io, t_ptr="fp32", t_out_ptr="fp32"),
                 dict(BLOCK=pick_blocks("euler", N * D, 1).block_n), pick_blocks("euler", N, 1)))
    f = pick_blocks("flow_matching", 32, D)
    pair = dict(x0_ptr=io, z_ptr="fp32", t_ptr="fp32", lab_ptr="i64", std_ptr="fp32",
                out_ptr=io, pred_ptr=io, row_loss_ptr="fp32", grad_ptr="fp32")
    fm_tiles = dict(BLOCK_N=f.block_n, BLOCK_D=f.block_d)
    jobs.append((f"flow_loss[{io},bridge]", flow_matching._loss_kernel, pair,
                 dict(FORM=0, WRITE_GRAD=True, **fm_tiles), f))
    for width in (D, 1024):
        for fb in candidate_blocks("folded_block", N, width, dtype=dtype):
            jobs.append((f"folded_block[{io},W={width},{fb}]", folded_step._residual_block_kernel,
                         dict(h_ptr="fp32", out_ptr="fp32", w1_ptr=io, b1_ptr=io, w2_ptr=io,
                              b2_ptr=io),
                         dict(BLOCK_M=fb.block_n, BLOCK_K=fb.block_d, BLOCK_H=fb.block_c,
                              WIDTH_PAD=width, PRECISION=precision), fb))
    for ff in candidate_blocks("folded_final", N, D, D, dtype):
        jobs.append((f"folded_final[{io},{ff}]", folded_step._final_euler_kernel,
                     dict(h_ptr="fp32", x_ptr="fp32", out_ptr="fp32", wf_ptr=io, bf_ptr=io),
                     dict(BLOCK_M=ff.block_n, BLOCK_K=ff.block_d, BLOCK_D=ff.block_c,
                          PRECISION=precision), ff))
    if io != "fp32":
        continue
    jobs.append(("flow_loss[fp32,endpoint]", flow_matching._loss_kernel, pair,
                 dict(FORM=1, WRITE_GRAD=True, **fm_tiles), f))
    for form in (0, 1):
        jobs.append((f"flow_pair[fp32,form={form}]", flow_matching._pair_kernel, pair,
                     dict(FORM=form, **fm_tiles), f))
    jobs.append(("cosine_lse", step_ensemble._cosine_lse_kernel, scoring, tiles, b))
    jobs.append(("ensemble_topk", step_ensemble._ensemble_topk_kernel, scoring,
                 dict(K=16, K_PAD=16, **tiles), b))
    jobs.append(("cosine_ce_forward", cosine_cross_entropy._forward_kernel, scoring, tiles, b))
    nb = pick_blocks("noise", 32, D)
    jobs.append(("noise", flow_matching._noise_kernel, dict(out_ptr="fp32"),
                 dict(BLOCK_N=nb.block_n, BLOCK_D=nb.block_d), nb))

with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
    print(json.dumps(pool.map(compile_job, range(len(jobs)))))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="SKIPPED, not passed: triton is not installed")
def test_every_kernel_compiles_for_hopper_sm90():
    result = run_python(COMPILE_SCRIPT, {"TRITON_INTERPRET": None})
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip(f"SKIPPED, not passed: no ptxas for an AOT compile: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    failures = {name: why for name, why, _ in compiled if why != "ok"}
    assert not failures, json.dumps(failures, indent=1)
    spills = {name: stats for name, _, stats in compiled if stats.get("spill_stores", 1)}
    assert not spills, f"register spills: {json.dumps(spills, indent=1)}"


@pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
def test_kernel_paths_report_themselves():
    x, table = torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    expected = "triton" if DEVICE == "cuda" else "triton-interpreter"
    assert dispatch.cosine_topk(x, table, 2).path == expected
    assert dispatch.flow_matching_noise(0, 2, 3, device=DEVICE).path == expected
