"""The fused cosine cross-entropy (online logsumexp forward, tiled backward) vs the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_support import HALF_SKIP_REASON, SKIP_REASON, assert_close, kernel_device

from fma_fast import reference
from fma_fast.ops import dispatch

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)


def batch(rows: int, classes: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g).to(DEVICE, dtype).requires_grad_()
    table = torch.randn(classes, dim, generator=g).to(DEVICE, dtype)
    labels = torch.randint(0, classes, (rows,), generator=g).to(DEVICE)
    return x, table, labels


# (rows, classes, dim, scale): C = 1 (zero loss, zero gradient), C not a tile multiple with
# odd D, several D slices in the backward, the released scale 100 with peaked softmaxes.
@pytest.mark.parametrize("rows,classes,dim,scale",
                         [(1, 1, 7, 100.0), (5, 37, 40, 10.0), (20, 50, 33, 100.0),
                          (17, 3, 70, 1.0)])
def test_loss_and_grad_equal_reference(rows, classes, dim, scale):
    x, table, labels = batch(rows, classes, dim, seed=rows + classes)
    result = dispatch.cosine_cross_entropy(x, table, labels, scale)
    assert result.path.startswith("triton")
    (2.5 * result.loss).backward()  # grad_output != 1 reaches the kernel as a device scalar
    grad = x.grad.clone()
    x.grad = None
    ref = reference.cosine_cross_entropy(x, table, labels, scale)
    (2.5 * ref).backward()
    # The loss is lse - scale·cos_y: cancellation leaves ~scale·eps absolute error.
    assert_close(result.loss, ref, "cosine CE loss", atol=scale * 2e-7)
    assert_close(grad, x.grad, "d loss / dx", atol=1e-6 * (1 + float(x.grad.abs().max())))


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
