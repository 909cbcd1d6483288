"""The fused folded-step kernels (residual block, final layer + Euler) against their twins."""

from __future__ import annotations

import pytest
import torch
from kernel_support import SKIP_REASON, kernel_device

from fma_fast import reference
from fma_fast.core.policy import TOLERANCES

pytestmark = pytest.mark.skipif(
    kernel_device() is None,
    reason=SKIP_REASON,
)

DEVICE = kernel_device() or "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])
SHAPES = [(1, 24, 24), (37, 48, 40), (5, 16, 33), (70, 40, 40)]  # (rows, width, dim)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str):
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-12)
    if error > tolerance:
        worst = (actual - expected).abs().argmax()
        row, col = divmod(int(worst), actual.shape[1])
        raise AssertionError(
            f"{what}: relative error {error:.2e} > {tolerance:.0e}; worst at row {row} col {col}: "
            f"{actual[row, col].item():.6f} vs {expected[row, col].item():.6f}"
        )


def weights(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype):
    return (0.3 * torch.randn(shape, generator=generator)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, dim", SHAPES)
def test_residual_block_matches_reference(rows, width, dim, dtype):
    from fma_fast.kernels.folded_step import residual_block

    generator = torch.Generator().manual_seed(rows * 1000 + width)
    h = (torch.randn(rows, width, generator=generator) * 2 + 0.5).to(DEVICE)
    w1, w2 = weights((width, width), generator, dtype), weights((width, width), generator, dtype)
    b1, b2 = weights((width,), generator, dtype), weights((width,), generator, dtype)
    expected = reference.folded_residual_block(
        h.double(), w1.double(), b1.double(), w2.double(), b2.double()
    )
    tolerance = TOLERANCES[dtype].chain
    assert_close(residual_block(h, w1, b1, w2, b2).double(), expected, tolerance, "residual block")
    in_place = h.clone()  # and weights as transposed views of (in, out) storage
    residual_block(in_place, w1.T.contiguous().T, b1, w2.T.contiguous().T, b2, out=in_place)
    assert_close(in_place.double(), expected, tolerance, "residual block in place")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, dim", SHAPES)
def test_final_euler_update_matches_reference(rows, width, dim, dtype):
    from fma_fast.kernels.folded_step import final_euler_update

    generator = torch.Generator().manual_seed(rows * 7 + dim)
    h = (torch.randn(rows, width, generator=generator) - 1.0).to(DEVICE)
    x = torch.randn(rows, dim, generator=generator).to(DEVICE)
    wf, bf = weights((dim, width), generator, dtype), weights((dim,), generator, dtype)
    expected = reference.folded_final_update(h.double(), x.double(), wf.double(), bf.double())
    assert_close(
        final_euler_update(h, x, wf, bf).double(), expected, TOLERANCES[dtype].chain, "final update"
    )
    state = x.clone()
    final_euler_update(h, state, wf.T.contiguous().T, bf, out=state)
    assert_close(state.double(), expected, TOLERANCES[dtype].chain, "final update in place")


def test_shape_errors_name_the_weight():
    from fma_fast.kernels.folded_step import final_euler_update, residual_block

    h = torch.zeros(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"w1 must have shape \(16, 16\)"):
        residual_block(h, torch.zeros(16, 8, device=DEVICE), h[0], torch.zeros(16, 16), h[0])
    with pytest.raises(ValueError, match="x has 2 rows but the hidden state 3"):
        final_euler_update(h, torch.zeros(2, 16, device=DEVICE), torch.zeros(16, 16), h[0])
