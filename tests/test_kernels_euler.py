"""The fused Euler step (x + h·v, t + h on a device scalar) against reference.euler_step."""

from __future__ import annotations

import pytest
import torch
from kernel_support import HALF_SKIP_REASON, SKIP_REASON, assert_close, kernel_device

from fma_fast import reference
from fma_fast.ops import dispatch

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 300)])
def test_ten_steps_equal_reference(shape, inplace):
    """A whole M=10, h=0.1 solve: t must accumulate in fp32 exactly as the reference's."""
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    x = torch.randn(shape, generator=g).to(DEVICE)
    t = torch.zeros((), device=DEVICE)
    ref_x, ref_t = x.clone(), t.clone()
    for step in range(10):
        v = torch.randn(shape, generator=g).to(DEVICE)
        x_in, t_in = x, t
        x, t, path = dispatch.euler_step(x, v, t, 0.1, inplace=inplace)
        ref_x, ref_t = reference.euler_step(ref_x, v, ref_t, 0.1)
        assert path.startswith("triton")
        assert (x is x_in and t is t_in) == inplace
        assert_close(x, ref_x, f"x after step {step + 1}")
        assert float(t) == float(ref_t), f"t after step {step + 1}: {float(t)} != {float(ref_t)}"


def test_out_of_place_leaves_inputs_alone():
    x = torch.ones(4, 5, device=DEVICE)
    t = torch.zeros((), device=DEVICE)
    new_x, new_t, _ = dispatch.euler_step(x, torch.ones_like(x), t, 0.25)
    assert torch.equal(x, torch.ones_like(x)) and float(t) == 0.0
    assert torch.equal(new_x, torch.full_like(x, 1.25)) and float(new_t) == 0.25


def test_non_contiguous_velocity():
    x = torch.randn(6, 10, device=DEVICE)
    v = torch.randn(10, 6, device=DEVICE).T
    t = torch.zeros((), device=DEVICE)
    new_x, _, _ = dispatch.euler_step(x, v, t, 0.1)
    assert_close(new_x, reference.euler_step(x, v, t, 0.1)[0], "x with a transposed velocity")


@pytest.mark.skipif(DEVICE != "cuda", reason=HALF_SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_velocity_updates_fp32_state_and_half_state(dtype):
    x = torch.randn(65, 77, device=DEVICE)
    v = torch.randn(65, 77, device=DEVICE).to(dtype)
    t = torch.zeros((), device=DEVICE)
    new_x, _, _ = dispatch.euler_step(x, v, t, 0.1)
    assert new_x.dtype == torch.float32
    assert_close(new_x, x + 0.1 * v.float(), "fp32 state, half velocity")
    half_x, _, _ = dispatch.euler_step(x.to(dtype), v, t, 0.1)
    assert half_x.dtype == dtype
    assert_close(half_x, x.to(dtype).float() + 0.1 * v.float(), "half state", dtype)
