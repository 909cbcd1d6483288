"""The Hopper launch candidates of the hot ops and the tuner that times them.

Every candidate must compute what the reference computes (here in the interpreter, natively on
CUDA) and compile for sm_90 without register spills (tests/test_kernels_dispatch.py). Which one
is fastest can only be measured on a GPU; the choice mechanism is tested with a fake timer.
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import SKIP_REASON, kernel_device
from support import relative_error

from fma_fast import reference
from fma_fast.kernels import _common
from fma_fast.kernels._common import Blocks, candidate_blocks, fastest_blocks, tuned_blocks

pytestmark = pytest.mark.skipif(
    kernel_device() is None,
    reason=SKIP_REASON,
)
DEVICE = kernel_device() or "cpu"


def hopper_candidates(monkeypatch, *args, **kwargs) -> list[Blocks]:
    """The candidates a GPU run would time (the interpreter otherwise gets its own tiles)."""
    with monkeypatch.context() as patch:
        patch.setattr(_common, "interpreter_active", lambda: False)
        return candidate_blocks(*args, **kwargs)


@pytest.mark.parametrize("op", _common.TUNED_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_candidates_start_with_the_default_and_are_distinct(monkeypatch, op, dtype):
    for rows, dim, classes in ((4096, 512, 1000), (10**6, 512, 100_000), (100, 1024, 512)):
        candidates = hopper_candidates(monkeypatch, op, rows, dim, classes, dtype)
        with monkeypatch.context() as patch:
            patch.setattr(_common, "interpreter_active", lambda: False)
            default = _common.pick_blocks(op, rows, dim, classes, dtype)
        where = f"{op} {dtype} N={rows} D={dim} C={classes}"
        assert candidates[0] == default, f"{where}: the default is not tried first"
        assert len(candidates) == len(set(candidates)), f"{where}: repeated {candidates}"
        if (rows, dim) == (4096, 512):
            assert len(candidates) >= 3, f"{where}: too few to tune: {candidates}"
        small = [b for b in candidates if min(b.block_n, b.block_d, b.block_c) < 16]
        assert not small, f"{where}: tl.dot needs tile sides >= 16: {small}"
    assert candidate_blocks("euler", 4096, 512) == [_common.pick_blocks("euler", 4096, 512)]


def test_every_folded_block_candidate_matches_reference(monkeypatch):
    from fma_fast.kernels.folded_step import residual_block

    rows, width = 70, 40  # odd width: every candidate masks a partial hidden and K chunk
    generator = torch.Generator().manual_seed(3)
    h = (torch.randn(rows, width, generator=generator) + 0.5).to(DEVICE)
    w1, w2 = (0.3 * torch.randn(2, width, width, generator=generator)).to(DEVICE)
    b1, b2 = (0.3 * torch.randn(2, width, generator=generator)).to(DEVICE)
    expected = reference.folded_residual_block(
        h.double(), w1.double(), b1.double(), w2.double(), b2.double()
    )
    for blocks in hopper_candidates(monkeypatch, "folded_block", 4096, 512):
        error = relative_error(residual_block(h, w1, b1, w2, b2, blocks=blocks), expected)
        assert error < 1e-5, f"folded_block with {blocks}: relative error {error:.2e}"


def test_every_folded_final_candidate_matches_reference(monkeypatch):
    from fma_fast.kernels.folded_step import final_euler_update

    rows, width, dim = 70, 40, 33
    generator = torch.Generator().manual_seed(4)
    h = (torch.randn(rows, width, generator=generator) - 1).to(DEVICE)
    x = torch.randn(rows, dim, generator=generator).to(DEVICE)
    wf = (0.3 * torch.randn(dim, width, generator=generator)).to(DEVICE)
    bf = (0.3 * torch.randn(dim, generator=generator)).to(DEVICE)
    expected = reference.folded_final_update(h.double(), x.double(), wf.double(), bf.double())
    for blocks in hopper_candidates(monkeypatch, "folded_final", 4096, 512, 512):
        error = relative_error(final_euler_update(h, x, wf, bf, blocks=blocks), expected)
        assert error < 1e-5, f"folded_final with {blocks}: relative error {error:.2e}"


def test_every_cosine_topk_candidate_matches_reference(monkeypatch):
    from fma_fast.kernels.cosine_topk import sort_topk, unsorted_topk

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(70, 33, generator=generator).to(DEVICE)
    table = torch.nn.functional.normalize(torch.randn(150, 33, generator=generator), dim=-1)
    table = table.to(DEVICE)
    expected_values, expected_indices = reference.cosine_logits(x, table).topk(5, dim=-1)
    for blocks in hopper_candidates(monkeypatch, "cosine_topk", 4096, 512, 1000):
        values, indices = sort_topk(*unsorted_topk(x, table, 5, blocks=blocks))
        error = float((values - expected_values).abs().max())
        assert error < 1e-5, f"cosine_topk with {blocks}: values off by {error:.2e}"
        assert torch.equal(indices, expected_indices), f"cosine_topk with {blocks}: indices"


def test_fastest_blocks_takes_the_smallest_time_and_the_first_of_ties():
    candidates = [Blocks(16, 16, 16, 4, 2), Blocks(32, 16, 16, 8, 2), Blocks(64, 16, 16, 8, 3)]
    launched: list[Blocks] = []
    times = {candidates[0]: 2.0, candidates[1]: 1.0, candidates[2]: 1.0}

    def timer(launch) -> float:
        launch()
        return times[launched[-1]]

    assert fastest_blocks(candidates, launched.append, timer) == candidates[1]
    assert launched == candidates, "every candidate must be launched once by the timer"


def test_tuning_is_off_by_default_and_on_the_cpu(monkeypatch):
    def launch(blocks: Blocks) -> None:
        raise AssertionError("nothing may be timed here")

    default = _common.pick_blocks("folded_block", 4096, 512)
    cpu = torch.device("cpu")
    monkeypatch.delenv("FMA_FAST_AUTOTUNE", raising=False)
    assert tuned_blocks("folded_block", 4096, 512, 1, torch.float32, cpu, launch) == default
    monkeypatch.setenv("FMA_FAST_AUTOTUNE", "1")  # still the CPU: the interpreter is not timed
    assert tuned_blocks("folded_block", 4096, 512, 1, torch.float32, cpu, launch) == default


@pytest.mark.skipif(DEVICE != "cuda", reason="SKIPPED, not passed: timing needs CUDA")
def test_tuning_on_cuda_picks_a_candidate_once(monkeypatch):
    from fma_fast.kernels.folded_step import residual_block

    monkeypatch.setenv("FMA_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(_common, "_TUNED", {})
    h = torch.randn(4096, 512, device="cuda")
    w = 0.05 * torch.randn(512, 512, device="cuda")
    b = torch.zeros(512, device="cuda")
    expected = residual_block(h, w, b, w, b, blocks=candidate_blocks("folded_block", 4096, 512)[0])
    got = residual_block(h, w, b, w, b)
    (key, chosen), = _common._TUNED.items()
    assert chosen in candidate_blocks("folded_block", 4096, 512), chosen
    assert relative_error(got, expected.double()) < 1e-5, f"tuned launch with {chosen} differs"
