"""fma_fast.cosine_cross_entropy: the loss and its gradients (features and class table) against
the plain formula, in class tiles with nothing (N, C) kept for the backward, and its checks."""

from __future__ import annotations

import pytest
import torch
from kernel_support import SKIP_REASON, assert_close, kernel_device

import fma_fast
from fma_fast.core import policy, reference

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(rows: int, classes: int, dim: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=generator, dtype=dtype).requires_grad_(True)
    z = torch.randn(classes, dim, generator=generator, dtype=dtype).requires_grad_(True)
    y = torch.randint(classes, (rows,), generator=generator)
    return x, z, y


def loss_and_grads(loss_of, x, z, y, upstream: float = 1.7):
    x.grad = z.grad = None
    loss = loss_of(x, z, y)
    (upstream * loss).backward()
    return loss.detach(), x.grad.clone(), z.grad.clone()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 rows x 4 classes, so odd row and class counts end in partial tiles."""
    monkeypatch.setattr(policy, "CLASS_TILE", 4)


@pytest.mark.parametrize(("rows", "classes", "dim", "scale"),
                         [(1, 1, 7, 100.0), (9, 13, 5, 100.0), (10, 4, 33, 10.0),
                          (3, 17, 8, 1.0)])
def test_loss_and_gradients_equal_the_formula(small_tiles, rows, classes, dim, scale):
    x, z, y = inputs(rows, classes, dim, seed=rows + classes)
    got = loss_and_grads(
        lambda a, b, c: fma_fast.cosine_cross_entropy(a, b, c, logit_scale=scale), x, z, y)
    expected = loss_and_grads(
        lambda a, b, c: reference.cosine_cross_entropy(a, b, c, scale), x, z, y)
    # The loss is lse − scale·cos_y: cancellation leaves ~scale·eps absolute error.
    assert_close(got[0], expected[0], "loss", atol=scale * 2e-7)
    for what, actual, wanted in (("d/dfeatures", got[1], expected[1]),
                                 ("d/dclass_features", got[2], expected[2])):
        assert_close(actual, wanted, what, atol=1e-6 * (1 + float(wanted.abs().max())))


def test_gradcheck_in_float64(small_tiles):
    x, z, y = inputs(6, 9, 5, seed=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: fma_fast.cosine_cross_entropy(a, b, y, logit_scale=4.0), (x, z))


def _saved_elements(loss_of, x, z, y) -> int:
    """Elements of every tensor autograd keeps for the backward of ``loss_of``."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(x, z, y)
    return total


def test_nothing_rows_by_classes_is_kept_for_the_backward(small_tiles):
    rows, classes, dim = 64, 200, 8
    x, z, y = inputs(rows, classes, dim, seed=1)
    saved = _saved_elements(fma_fast.cosine_cross_entropy, x, z, y)
    assert saved < rows * classes, f"{saved} elements saved for the backward"
    plain = _saved_elements(lambda a, b, c: fma_fast.cosine_cross_entropy(
        a, b, c, backend="reference"), x, z, y)
    assert plain >= rows * classes, "the count cannot see an (N, C) matrix"


def test_a_table_without_gradient_gets_none(small_tiles):
    x, z, y = inputs(5, 6, 4, seed=2)
    z = z.detach()
    fma_fast.cosine_cross_entropy(x, z, y).backward()
    assert x.grad is not None and z.grad is None


@pytest.mark.skipif(kernel_device() is None, reason=SKIP_REASON)
def test_the_kernel_path_gives_the_formula():
    """backend="triton": the fused kernel (the interpreter on the CPU) for a constant class
    table; a table that needs a gradient is refused there (the kernel has none for it)."""
    device = kernel_device()
    x, z, y = inputs(7, 11, 9, seed=4)
    x = x.detach().to(device).requires_grad_(True)
    z, y = z.detach().to(device), y.to(device)
    loss = fma_fast.cosine_cross_entropy(x, z, y, backend="triton")
    loss.backward()
    got = (loss.detach(), x.grad.clone())
    x.grad = None
    expected = reference.cosine_cross_entropy(x, z, y)
    expected.backward()
    assert_close(got[0], expected.detach(), "loss", atol=100 * 2e-7)
    assert_close(got[1], x.grad, "d/dfeatures", atol=1e-6 * (1 + float(x.grad.abs().max())))
    with pytest.raises(RuntimeError, match="no gradient for class_features"):
        fma_fast.cosine_cross_entropy(x, z.requires_grad_(True), y, backend="triton")


def test_checks():
    x, z, y = inputs(4, 3, 5, seed=0)
    cases = [
        ((x, z, y[:, None]), ValueError, "labels must be 1-D"),
        ((x, z, torch.tensor([0, 1, 3, 0])), ValueError, r"labels must lie in \[0, 3\)"),
        ((x, z, torch.tensor([0, 1, -1, 0])), ValueError, r"labels must lie in \[0, 3\)"),
        ((x, z, y.float()), TypeError, "labels must be an integer tensor"),
        ((x, z, y[:3]), ValueError, "labels has 3 entries but the features have 4 rows"),
        ((x, z[:, :4], y), ValueError, "class_features has dim 4"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            fma_fast.cosine_cross_entropy(*args)
    for name, position in (("features", 0), ("class_features", 1)):
        args = [x.detach().clone(), z.detach().clone(), y]
        args[position][1, 2] = float("nan")
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            fma_fast.cosine_cross_entropy(*args)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        fma_fast.cosine_cross_entropy(x, z, y, logit_scale=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fma_fast.cosine_cross_entropy(x, z, y, backend="folded")
