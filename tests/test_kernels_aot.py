"""Launch specialisations without a GPU (fma_fast/aot.py's ``recording``: Triton's own binder on
the launchers' real arguments, as on an sm_90 GPU, compiling nothing): the AOT check compiles
what a real launch compiles, and the solve's kernel probe compiles every variant the solve runs.
One child process without the interpreter holds both checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fma_fast.kernels._common import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON,
                                reason="SKIPPED, not passed: triton is not installed")

CHILD = """
    import json
    import torch
    from fma_fast.solver import fused
    from fma_fast import aot
    from fma_fast.core.model import VelocityNet
    from fma_fast.solver.plan import solver_plan

    def named(job, values):
        return {job.kernel.arg_names[path[0]]: value for path, value in values.items()}

    final = next(job for job in aot._jobs(90) if job.name == "folded_final[bf16,W=512]")
    out = {"final": {"constexprs": named(final, final.constexprs),
                     "attrs": named(final, final.attrs)}}

    torch.manual_seed(0)
    # 33 wide: bf16 weight views of successive steps and blocks sit at 2-byte offsets mod 16
    model = VelocityNet(33, blocks=2, width=33)
    for dtype in (torch.float32, torch.bfloat16):
        plan = solver_plan(model, 3, dtype=dtype, device="cpu")
        fused._RUNS.clear()
        with aot.recording(90) as probe:
            assert fused.kernels_run(plan)
        solve = {}
        for rows in (1, 37, 4096):
            with aot.recording(90) as launches:
                fused.fused_final(plan, torch.randn(rows, 33))
            solve[rows] = sorted({str(launch[1]) for launch in launches})
        out[str(dtype)] = {"probe": sorted({str(launch[1]) for launch in probe}),
                           "solve": solve}
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def recorded() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_aot_compiles_the_specialisation_of_a_real_launch(recorded):
    """bf16 folded_final as solver/fused.py launches it: the final weight is a transposed view
    (its out-stride is 1, which Triton makes a constant), D = W = 512 and the buffers are
    aligned (tt.divisibility 16 hints on pointers and strides). Compiled without these, the
    AOT table showed 211 registers where the real compile needs about 100."""
    final = recorded["final"]
    assert final["constexprs"]["stride_wfo"] == 1, final
    divisible = [["tt.divisibility", 16]]
    for name in ("h_ptr", "x_ptr", "out_ptr", "wf_ptr", "bf_ptr", "width", "dim", "stride_h",
                 "stride_x", "stride_out", "stride_wfi"):
        assert final["attrs"][name] == divisible, (name, final["attrs"])
    assert "n_rows" not in final["attrs"], "n_rows must not be specialised (any batch size)"


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_the_kernel_probe_compiles_every_variant_the_solve_runs(recorded, dtype):
    """kernels_run decides between the fused kernels and the torch chain; a variant it did not
    compile could still fail in the solve, past the fallback. One row (a constant 1 to Triton)
    of step 0 alone missed the batches' row counts and the other steps' weight alignments."""
    probe = set(recorded[dtype]["probe"])
    for rows, keys in recorded[dtype]["solve"].items():
        missed = set(keys) - probe
        assert not missed, f"{dtype}, {rows} rows: {len(missed)} variant(s) not probed"
