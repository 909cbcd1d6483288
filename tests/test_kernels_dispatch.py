"""Routing (which path runs and why), import without triton, and Hopper compilation of kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_support import SKIP_REASON, assert_close, kernel_device

from fma_fast import reference
from fma_fast.kernels._common import HAS_TRITON
from fma_fast.ops import dispatch

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
        from fma_fast.ops import dispatch
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
        from fma_fast.ops import dispatch
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


@pytest.fixture(scope="module")
def aot_compiles() -> list[dict]:
    """Every kernel and launch candidate compiled for sm_80, sm_89 and sm_90 in one child
    process (the compiles need triton without the interpreter)."""
    result = run_python("""
        import json
        from fma_fast import aot
        print(json.dumps(aot.compile_all()))
    """, {"TRITON_INTERPRET": None})
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip(f"SKIPPED, not passed: no ptxas for an AOT compile: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="SKIPPED, not passed: triton is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_every_kernel_and_candidate_fits_the_architecture(aot_compiles, arch):
    """Every kernel family, with the specialisation of its real launches, lowered through
    Triton's GPU pipeline for ``arch`` on a machine without a GPU: no compile error, no register
    spill beyond ptxas's own small occupancy trades (aot.SMALL_SPILL_BYTES), registers and
    shared memory within what one block may have there. It does not run them."""
    from fma_fast.aot import OPS

    rows = [row for row in aot_compiles if row["arch"] == arch]
    compiled = {row["kernel"].split("[")[0] for row in rows}
    assert compiled == set(OPS.values()), f"{arch}: missing {set(OPS.values()) - compiled}"
    bad = {f"{row['kernel']} {row['blocks']}": row["problem"] for row in rows if not row["ok"]}
    assert not bad, f"{arch}: {json.dumps(bad, indent=1)}"


@pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
def test_kernel_paths_report_themselves():
    x, table = torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    expected = "triton" if DEVICE == "cuda" else "triton-interpreter"
    assert dispatch.cosine_topk(x, table, 2).path == expected
    assert dispatch.flow_matching_noise(0, 2, 3, device=DEVICE).path == expected
