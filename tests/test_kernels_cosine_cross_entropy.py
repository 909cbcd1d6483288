"""The fused cosine cross-entropy (online logsumexp forward, tiled backward) vs the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    HALF_SKIP_REASON,
    NUMERICS,
    SKIP_REASON,
    assert_close,
    kernel_device,
    numerics_context,
)

from fma_fast import reference
from fma_fast.core.policy import logit_tolerance
from fma_fast.kernels._common import DEFAULT_DOT_PRECISION
from fma_fast.ops import dispatch

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
if DEVICE is not None:
    from fma_fast.kernels import cosine_cross_entropy


def batch(rows: int, classes: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    table = torch.randn(classes, dim, generator=g).to(DEVICE, dtype)
    labels = torch.randint(0, classes, (rows,), generator=g).to(DEVICE)
    return x, table, labels


def check_against_reference(rows: int, classes: int, dim: int, scale: float,
                            precision: str = DEFAULT_DOT_PRECISION) -> None:
    """Loss and gradient of the kernel vs the reference, within the tolerances the error model
    gives for the default dot precision (``policy.logit_tolerance``): the loss is a
    log-probability (size 1, cosine errors amplified by the scale); the gradient is
    g·scale/(N·‖x‖) times O(1) terms (Σ p_c ẑ_c - ẑ_y and the projection), whatever its value
    (0 for C = 1)."""
    x, table, labels = batch(rows, classes, dim, seed=rows + classes)
    result = dispatch.cosine_cross_entropy(x, table, labels, scale, precision=precision)
    assert result.path.startswith("triton")
    grad_output = 2.5  # != 1: it reaches the kernel as a device scalar
    (grad_output * result.loss).backward()
    grad = x.grad.clone()
    x.grad = None
    ref = reference.cosine_cross_entropy(x, table, labels, scale)
    (grad_output * ref).backward()
    tolerance = logit_tolerance(torch.float32, scale, DEFAULT_DOT_PRECISION)
    grad_size = grad_output * scale / (rows * float(x.detach().norm(dim=1).min()))
    assert_close(result.loss, ref, "cosine CE loss", atol=tolerance)
    assert_close(grad, x.grad, "d loss / dx", atol=grad_size * tolerance)


# (rows, classes, dim, scale): C = 1 (zero loss, zero gradient), C not a tile multiple with
# odd D, several D slices in the backward, the released scale 100 with peaked softmaxes.
SHAPES = [(1, 1, 7, 100.0), (5, 37, 40, 10.0), (20, 50, 33, 100.0), (17, 3, 70, 1.0)]


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("rows,classes,dim,scale", SHAPES)
def test_loss_and_grad_equal_reference(rows, classes, dim, scale, numerics):
    with numerics_context(numerics, cosine_cross_entropy):
        check_against_reference(rows, classes, dim, scale)


@pytest.mark.parametrize("rows,classes,dim,scale", [SHAPES[0], SHAPES[2]])
def test_the_tolerance_refuses_plain_tf32(rows, classes, dim, scale):
    """The tolerances have teeth: tf32 dots (10 mantissa bits instead of tf32x3's ~21), run
    as a GPU runs them, must fail them."""
    numerics = "native" if DEVICE == "cuda" else "emulated-sm90"  # real tf32 on a GPU
    with (numerics_context(numerics, cosine_cross_entropy),
          pytest.raises(AssertionError, match="beyond rtol")):
        check_against_reference(rows, classes, dim, scale, precision="tf32")


def test_table_requiring_grad_goes_to_the_reference_and_triton_refuses_it():
    x, table, labels = batch(4, 6, 8, seed=1)
    table.requires_grad_()
    result = dispatch.cosine_cross_entropy(x, table, labels)
    assert result.path == "reference"
    result.loss.backward()
    assert table.grad is not None
    with pytest.raises(RuntimeError, match="no gradient for class_features"):
        dispatch.cosine_cross_entropy(x, table, labels, backend="triton")
    with torch.no_grad():
        assert dispatch.cosine_cross_entropy(x, table, labels).path.startswith("triton")


@pytest.mark.skipif(DEVICE != "cuda", reason=HALF_SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, table, labels = batch(200, 1000, 512, seed=2, dtype=dtype)
    loss = dispatch.cosine_cross_entropy(x, table, labels, 30.0).loss
    loss.backward()
    x_ref = x.detach().float().requires_grad_()
    ref = reference.cosine_cross_entropy(x_ref, table.float(), labels, 30.0)
    ref.backward()
    # scale 30 times a cosine off by a few half-precision ulps
    assert_close(loss, ref, f"loss in {dtype}", dtype, atol=30 * 4 * torch.finfo(dtype).eps)
    assert_close(x.grad, x_ref.grad, f"grad in {dtype}", dtype,
                 atol=0.05 * float(x_ref.grad.abs().max()))


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_reference_passes_gradcheck_in_float64(scale):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(
        lambda x, z: reference.cosine_cross_entropy(x, z, labels, scale), (x, table))
