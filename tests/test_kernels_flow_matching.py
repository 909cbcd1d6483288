"""The fused flow-matching pair/loss kernels against fma_fast.core.reference, and their noise."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_support import HALF_SKIP_REASON, SKIP_REASON, assert_close, kernel_device

from fma_fast import reference
from fma_fast.core.model import VelocityNet
from fma_fast.ops import dispatch

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)

# (rows, classes, dim): odd D, a single row, a single class, D below one tile.
SHAPES = [(5, 7, 40), (1, 1, 3), (33, 4, 17)]
FORMS = ["bridge", "endpoint"]


def make_batch(rows: int, classes: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(rows, dim, generator=g)
    table = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (rows,), generator=g)
    t = torch.rand(rows, generator=g)
    t[0] = 0.0  # the clamp must act exactly as reference.clamp_time at both ends
    if rows > 1:
        t[-1] = 1.0
    std = torch.rand(dim, generator=g) + 0.1
    to = dict(device=DEVICE, dtype=dtype)
    return (x0.to(**to), labels.to(DEVICE), table.to(**to), t.to(DEVICE),
            std.to(DEVICE))


def reference_pair(x0, labels, table, t, std, seed, gamma, form):
    noise = dispatch.flow_matching_noise(seed, *x0.shape, device=x0.device).noise
    return reference.training_pair(x0.float(), table.float()[labels], t, noise, gamma=gamma,
                                   form=form, feature_std=std)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rows,classes,dim", SHAPES)
def test_pair_loss_and_grad_equal_reference(rows, classes, dim, form):
    x0, labels, table, t, std = make_batch(rows, classes, dim, seed=rows * dim)
    kw = dict(seed=1234, gamma=0.7, form=form, feature_std=std)
    pair = dispatch.fused_pair(x0, labels, table, t, **kw)
    assert pair.path.startswith("triton")
    ref_x_t, ref_target = reference_pair(x0, labels, table, t, std, 1234, 0.7, form)
    assert_close(pair.x_t, ref_x_t, f"x_t ({form}, {rows}x{dim})")
    assert_close(pair.t, reference.clamp_time(t), "clamped t", rtol=0, atol=0)

    pred = torch.randn(rows, dim, device=DEVICE, requires_grad=True)
    fused = dispatch.fused_loss(pred, x0, labels, table, t, **kw)
    (3.0 * fused.loss).backward()  # grad_output != 1 must scale the stored gradient
    grad = pred.grad.clone()
    pred.grad = None
    ref_loss = reference.flow_matching_loss(pred, ref_target)
    (3.0 * ref_loss).backward()
    assert_close(fused.loss, ref_loss, "loss")
    # 2(pred - v)/N is formed in another order than autograd's: allow fp32 rounding of |v|.
    assert_close(grad, pred.grad, "d loss / d pred", atol=1e-6 * float(ref_target.abs().max()))


def test_loss_without_grad_and_target_is_never_stored():
    x0, labels, table, t, std = make_batch(9, 3, 20, seed=3)
    pred = torch.randn(9, 20, device=DEVICE)
    with torch.no_grad():
        loss = dispatch.fused_loss(pred, x0, labels, table, t, seed=5, gamma=0.3).loss
    _, target = reference_pair(x0, labels, table, t, std, 5, 0.3, "bridge")
    assert_close(loss, reference.flow_matching_loss(pred, target), "loss under no_grad")


def test_gamma_zero_is_the_straight_line():
    x0, labels, table, t, _ = make_batch(6, 4, 19, seed=4)
    x_t = dispatch.fused_pair(x0, labels, table, t, seed=9, gamma=0.0).x_t
    tc = reference.clamp_time(t)
    assert_close(x_t, (1 - tc) * x0 + tc * table[labels], "x_t at gamma=0")


def test_non_contiguous_inputs():
    x0, labels, table, t, std = make_batch(7, 5, 24, seed=5)
    x0_view = x0.t().contiguous().t()  # same values, column-major strides
    pair = dispatch.fused_pair(x0_view, labels, table, t, seed=2, gamma=0.5)
    ref_x_t, _ = reference_pair(x0, labels, table, t, std, 2, 0.5, "bridge")
    assert_close(pair.x_t, ref_x_t, "x_t from a column-major x0")


def test_fit_style_step_gives_reference_parameter_gradients():
    """pair -> model -> loss -> backward: the network's gradients equal the reference's."""
    x0, labels, table, t, std = make_batch(8, 3, 16, seed=6)
    torch.manual_seed(0)
    model = VelocityNet(16, blocks=1).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    kw = dict(seed=77, gamma=0.4, form="endpoint", feature_std=std)

    x_t, t_c, _ = dispatch.fused_pair(x0, labels, table, t, **kw)
    dispatch.fused_loss(model(x_t, t_c), x0, labels, table, t, **kw).loss.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    ref_x_t, ref_target = reference_pair(x0, labels, table, t, std, 77, 0.4, "endpoint")
    reference.flow_matching_loss(model(ref_x_t, reference.clamp_time(t)), ref_target).backward()
    for (name, p), g in zip(model.named_parameters(), fused_grads):
        assert_close(g, p.grad, f"grad of {name}", atol=1e-5 * (1 + float(p.grad.abs().max())))


@pytest.mark.skipif(DEVICE != "cuda", reason=HALF_SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    x0, labels, table, t, std = make_batch(37, 5, 96, seed=7, dtype=dtype)
    pair = dispatch.fused_pair(x0, labels, table, t, seed=3, gamma=0.5)
    ref_x_t, ref_target = reference_pair(x0, labels, table, t, std, 3, 0.5, "bridge")
    assert pair.x_t.dtype == dtype
    assert_close(pair.x_t, ref_x_t, f"x_t in {dtype}", dtype)
    pred = torch.randn(37, 96, device=DEVICE, dtype=dtype, requires_grad=True)
    loss = dispatch.fused_loss(pred, x0, labels, table, t, seed=3, gamma=0.5).loss
    # A GradScaler-sized grad_output: the gradient must be scaled before the cast to the half
    # dtype, or its small entries underflow.
    (65536.0 * loss).backward()
    ref_pred = pred.detach().float().requires_grad_()
    ref_loss = reference.flow_matching_loss(ref_pred, ref_target)
    (65536.0 * ref_loss).backward()
    assert_close(loss, ref_loss, f"loss in {dtype}", dtype)
    assert_close(pred.grad.float() / 65536, ref_pred.grad / 65536, f"grad in {dtype}", dtype,
                 atol=1e-2 * float(ref_pred.grad.abs().max()) / 65536)


def test_reference_loss_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(8)
    pred = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: reference.flow_matching_loss(p, target), (pred,))


# ------------------------------------------------------------------------------ the noise

# Sample sizes and bounds: n i.i.d. N(0,1) samples have a mean with sd 1/sqrt(n), a sample
# variance with sd sqrt(2/n), and a sample correlation of two independent columns with sd
# 1/sqrt(n). Every bound below is 5 of those sds: a correct generator trips one of the ~300
# checks with probability < 1e-4 (and the seeds are fixed, so the outcome is reproducible).
ROWS, DIM = 4096, 16


@pytest.fixture(scope="module")
def noise_tall() -> torch.Tensor:
    return dispatch.flow_matching_noise(11, ROWS, DIM, device=DEVICE).noise.double().cpu()


@pytest.fixture(scope="module")
def noise_wide() -> torch.Tensor:
    """Another seed, transposed shape: same offsets 0..n-1 (offset = row·D + col)."""
    return dispatch.flow_matching_noise(12, DIM, ROWS, device=DEVICE).noise.double().cpu()


def test_noise_moments(noise_tall):
    flat = noise_tall.flatten()
    n = flat.numel()
    assert abs(float(flat.mean())) < 5 / math.sqrt(n), f"mean {float(flat.mean()):.5f}"
    assert abs(float(flat.var()) - 1) < 5 * math.sqrt(2 / n), f"variance {float(flat.var()):.5f}"
    inside = float((flat.abs() < 1).double().mean())  # P(|N(0,1)| < 1) = 0.682689
    assert abs(inside - 0.682689) < 5 * math.sqrt(0.682689 * 0.317311 / n), f"P(|e|<1)={inside}"


def _max_offdiag_corr(samples: torch.Tensor) -> float:
    """Largest |correlation| between two different columns of (samples, variables)."""
    corr = torch.corrcoef(samples.T)
    return float((corr - torch.eye(corr.shape[0], dtype=corr.dtype)).abs().max())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_noise_uncorrelated_across_dims_rows_and_offsets(noise_tall, noise_wide):
    bound = 5 / math.sqrt(ROWS)
    assert _max_offdiag_corr(noise_tall) < bound, "dims correlate"
    assert _max_offdiag_corr(noise_wide.T) < bound, "rows correlate"
    flat = noise_tall.flatten()
    flat_bound = 5 / math.sqrt(flat.numel())
    assert abs(_corr(flat[:-1], flat[1:])) < flat_bound, "neighbouring offsets correlate"
    assert abs(_corr(flat[:-DIM], flat[DIM:])) < flat_bound, "next row, same dim correlate"


def test_noise_reproducible_and_seed_dependent(noise_tall, noise_wide):
    # Fewer rows from the same seed is a prefix: the value depends on (seed, row·D + col) only.
    head = dispatch.flow_matching_noise(11, 70, DIM, device=DEVICE).noise.double().cpu()
    assert torch.equal(head, noise_tall[:70]), "same seed and offsets gave different noise"
    tall, wide = noise_tall.flatten(), noise_wide.flatten()
    assert not torch.equal(tall, wide)
    corr = _corr(tall, wide)
    assert abs(corr) < 5 / math.sqrt(tall.numel()), f"seeds 11 and 12 correlate: {corr}"


def test_reference_path_pair_and_loss_share_their_noise():
    """On the reference path the seed drives a torch.Generator: pair and loss still agree."""
    x0, labels, table, t, std = make_batch(6, 3, 10, seed=9)
    kw = dict(seed=21, gamma=0.8, backend="reference")
    pair = dispatch.fused_pair(x0, labels, table, t, **kw)
    noise = dispatch.flow_matching_noise(21, 6, 10, device=DEVICE, backend="reference")
    assert pair.path == noise.path == "reference"
    ref_x_t, ref_target = reference.training_pair(x0, table[labels], t, noise.noise, gamma=0.8)
    assert torch.equal(pair.x_t, ref_x_t)
    pred = torch.randn(6, 10, device=DEVICE)
    loss = dispatch.fused_loss(pred, x0, labels, table, t, **kw)
    assert torch.equal(loss.loss, reference.flow_matching_loss(pred, ref_target))
