"""The interpreter's GPU numerics (kernels/tf32_emulation.py): tf32 rounding on values worked out
by hand, the tf32x3 split on a dot worked out by hand, and the kernels under it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from kernel_support import kernel_device

from fma_fast import reference
from fma_fast.kernels._common import HAS_TRITON
from fma_fast.ops import dispatch

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or kernel_device() != "cpu",
    reason="SKIPPED, not passed: the emulation is a Triton-interpreter tool",
)
if HAS_TRITON:
    from fma_fast.kernels import tf32_emulation

ONE = 1.0
ULP_TF32 = 2.0**-10  # tf32 keeps 10 mantissa bits


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_tf32_round_is_nearest_ties_away_and_truncate_drops_the_low_bits():
    half = ULP_TF32 / 2
    values = f32(ONE + half, -(ONE + half), ONE + half / 2, ONE + half + 2.0**-20,
                 ONE + ULP_TF32 + 2.0**-23, np.inf, -np.inf)
    rounded = f32(ONE + ULP_TF32, -(ONE + ULP_TF32), ONE, ONE + ULP_TF32,
                  ONE + ULP_TF32, np.inf, -np.inf)
    truncated = f32(ONE, -ONE, ONE, ONE, ONE + ULP_TF32, np.inf, -np.inf)
    assert np.array_equal(tf32_emulation.tf32_round(values), rounded)
    assert np.array_equal(tf32_emulation.tf32_truncate(values), truncated)
    assert np.isnan(tf32_emulation.tf32_round(f32(np.nan))[0])


def test_tf32x3_keeps_the_lo_part_as_tf32_and_drops_lo_times_lo():
    # a = 1 + 2^-12 + 2^-23: big = 1 (2^-12 is under half a tf32 ulp), small = 2^-12 + 2^-23,
    # which the tensor core reads as 2^-12 (its 2^-23 bit is 11 places down). b = 1 + 2^-12:
    # big 1, small 2^-12. tf32x3: small·big + big·small + big·big = 2^-12 + 2^-12 + 1;
    # exact: 1 + 2^-11 + 2^-23 + 2^-24 + 2^-35; tf32: 1·1.
    a, b = f32(ONE + 2.0**-12 + 2.0**-23).reshape(1, 1), f32(ONE + 2.0**-12).reshape(1, 1)
    zero = np.zeros((1, 1), np.float32)
    assert tf32_emulation.tf32x3_dot(a, b, zero)[0, 0] == np.float32(ONE + 2.0**-11)
    assert tf32_emulation.tf32_dot(a, b, zero)[0, 0] == np.float32(ONE)
    # the accumulator is added after the three products
    assert tf32_emulation.tf32x3_dot(a, b, zero + 2)[0, 0] == np.float32(3 + 2.0**-11)


def test_tf32x3_error_is_within_its_model_and_tf32_is_not():
    generator = np.random.default_rng(0)
    a = generator.standard_normal((16, 64)).astype(np.float32)
    b = generator.standard_normal((64, 24)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    zero = np.zeros((16, 24), np.float32)
    x3 = np.abs(tf32_emulation.tf32x3_dot(a, b, zero) - exact) / bound
    x1 = np.abs(tf32_emulation.tf32_dot(a, b, zero) - exact) / bound
    # per product 2.5·2^-21 (lo·lo dropped, lo parts truncated), plus fp32 sums of 8 slices
    assert x3.max() <= 2.5 * 2.0**-21 + 8 * 2.0**-24, x3.max()
    assert x1.max() > 64 * x3.max(), (x1.max(), x3.max())


def test_the_kernels_follow_each_dots_input_precision_only_when_emulated():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 48, generator=generator)
    table = torch.nn.functional.normalize(torch.randn(30, 48, generator=generator), dim=-1)
    expected = reference.cosine_logits(x.double(), table.double()).topk(3, dim=-1).values

    def error(precision: str) -> float:
        got = dispatch.cosine_topk(x, table, 3, normalized=True, precision=precision).values
        return float((got.double() - expected).abs().max())

    before = tf32_emulation.active()  # on in a run with FMA_FAST_INTERPRET_TF32=1
    with tf32_emulation.emulated(False):
        exact = {p: error(p) for p in ("ieee", "tf32x3", "tf32")}
    with tf32_emulation.emulated():
        gpu = {p: error(p) for p in ("ieee", "tf32x3", "tf32")}
    assert max(exact.values()) < 1e-6, exact  # the interpreter's own dots: exact products
    assert gpu["ieee"] == exact["ieee"], (gpu, exact)
    assert gpu["tf32"] > 1e-4 > 1e-6 > gpu["tf32x3"], gpu
    assert tf32_emulation.active() == before, "emulated() must restore the previous state"


def test_the_environment_variable_installs_it_at_import():
    env = {**os.environ, "TRITON_INTERPRET": "1", tf32_emulation.ENV: "1"}
    code = "from fma_fast.kernels import tf32_emulation; print(tf32_emulation.active())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.stdout.split() == ["True"], done.stderr[-2000:]
