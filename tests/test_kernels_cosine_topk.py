"""Fused cosine top-k and the step-ensemble top-k against the reference, and their memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_support import (
    HALF_SKIP_REASON,
    SKIP_REASON,
    assert_close,
    exact_ties,
    kernel_device,
    tie_rule_topk,
)
from support import LargestTensor

from fma_fast import reference
from fma_fast.ops import dispatch

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)

# (rows, classes, dim, k): a 1×1 problem, C not a multiple of the tile, odd D, k = C across
# several tiles, the largest k we promise (16), and k = C = 1 with D below one chunk.
CASES = [(1, 1, 7, 1), (5, 37, 40, 3), (20, 50, 33, 50), (33, 100, 24, 16), (17, 130, 64, 5)]


def features(rows: int, classes: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    table = torch.randn(classes, dim, generator=g)
    return x.to(DEVICE, dtype), table.to(DEVICE, dtype)


def check_topk(result, x, table, k, what, scale=1.0, atol=1e-6):
    """Values equal the reference top-k (fp32 tolerances); every index scores its value in the
    reference matrix; indices are distinct and equal the reference's wherever the reference
    has no near-tie."""
    dtype, rtol = torch.float32, 1e-5
    cos = scale * reference.cosine_logits(x, table)
    ref_values, ref_indices = cos.topk(k, dim=-1)
    assert result.values.shape == result.indices.shape == (x.shape[0], k), what
    assert_close(result.values, ref_values, f"{what}: values", dtype, rtol, atol)
    assert_close(cos.gather(1, result.indices), result.values, f"{what}: cos at indices", dtype,
                 rtol, atol)
    assert bool((result.indices.sort(1).values.diff(dim=1) > 0).all()), f"{what}: repeated index"
    # A neighbour within 1e-4 makes the order legitimately ambiguous; compare the rest.
    top = cos.topk(min(k + 1, cos.shape[1]), dim=-1).values
    if k == cos.shape[1]:
        top = torch.cat([top, torch.full_like(top[:, :1], -torch.inf)], 1)
    after = top[:, :-1] - top[:, 1:]
    before = torch.cat([torch.full_like(after[:, :1], torch.inf), after[:, :-1]], 1)
    separated = torch.minimum(after, before) > 1e-4
    mismatch = separated & (result.indices != ref_indices)
    if bool(mismatch.any()):
        row, col = (int(i) for i in mismatch.nonzero()[0])
        raise AssertionError(f"{what}: index at row {row}, rank {col} is "
                             f"{int(result.indices[row, col])}, reference "
                             f"{int(ref_indices[row, col])} (cos {float(ref_values[row, col])})")
    assert float(separated.double().mean()) > 0.5, f"{what}: the data are all near-ties"


@pytest.mark.parametrize("rows,classes,dim,k", CASES)
def test_cosine_topk_equals_reference(rows, classes, dim, k):
    x, table = features(rows, classes, dim, seed=classes + k)
    result = dispatch.cosine_topk(x, table, k)
    assert result.path.startswith("triton")
    check_topk(result, x, table, k, f"topk N={rows} C={classes} D={dim} k={k}")


def test_logit_scale_and_prenormalised_table():
    x, table = features(9, 23, 20, seed=1)
    result = dispatch.cosine_topk(x, F.normalize(table, dim=-1), 4, logit_scale=100.0,
                                  normalized=True)
    check_topk(result, x, table, 4, "scaled, normalized=True", scale=100.0, atol=1e-4)


def test_exact_ties_give_valid_distinct_indices():
    """Duplicated class rows tie exactly: any order, but the values must be the reference's."""
    x, table = features(6, 5, 16, seed=2)
    table = torch.cat([table, table, 3 * table])  # 3 classes per direction, same cosine
    result = dispatch.cosine_topk(x, table, 7)
    cos = reference.cosine_logits(x, table)
    assert_close(result.values, cos.topk(7, dim=-1).values, "tied values")
    assert_close(cos.gather(1, result.indices), result.values, "cos at tied indices")
    assert bool((result.indices.sort(1).values.diff(dim=1) > 0).all()), "repeated index"


@pytest.mark.skipif(DEVICE != "cuda", reason=HALF_SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x, table = features(300, 1000, 512, seed=3, dtype=dtype)
    result = dispatch.cosine_topk(x, table, 5)
    ref = reference.cosine_logits(x, table)
    # Values: the table is rounded to the input dtype before the tensor-core dot.
    tol = 4 * torch.finfo(dtype).eps
    assert_close(result.values, ref.topk(5, dim=-1).values, f"{dtype} values", dtype, 0, tol)
    assert_close(ref.gather(1, result.indices), result.values, f"{dtype} cos at indices", dtype,
                 0, tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="SKIPPED, not passed: tf32 only exists on CUDA")
def test_fp32_default_precision_is_near_fp32_on_cuda():
    x, table = features(256, 2000, 512, seed=4)
    result = dispatch.cosine_topk(x, table, 5)  # tf32x3 by default
    # tf32x3 keeps ~2^-21 per product; over D=512 terms of a unit-norm dot that is < 1e-5.
    check_topk(result, x, table, 5, "tf32x3 on CUDA", atol=1e-5)


# ---------------------------------------------------------------------- step ensemble


def ensemble_states(rows, dim, steps, seed):
    """A real trajectory of a smooth toy field, so states are correlated like a solve's."""
    g = torch.Generator().manual_seed(seed)
    weight = 0.5 * torch.randn(dim, dim, generator=g).to(DEVICE)
    x = torch.randn(rows, dim, generator=g).to(DEVICE)

    def field(x, t):
        return torch.tanh(x @ weight) * (1 + t)

    return field, x, reference.euler_solve(field, x, steps, 0.1, return_trajectory=True)


@pytest.mark.parametrize("rows,classes,dim,k", [(7, 37, 20, 3), (1, 1, 9, 1), (18, 21, 33, 21)])
def test_step_ensemble_equals_reference(rows, classes, dim, k):
    field, x, trajectory = ensemble_states(rows, dim, 10, seed=rows + classes)
    _, table = features(rows, classes, dim, seed=k)
    result = dispatch.step_ensemble_topk([trajectory[s] for s in (0, 4, 8)], table, k)
    assert result.path.startswith("triton")
    probs = reference.step_ensemble_probs(field, x, table, steps=10, ensemble_steps=(0, 4, 8))
    ref_values, ref_indices = probs.topk(k, dim=-1)
    # scale 100 amplifies fp32 rounding of a cosine (~6e-8) into ~1e-5 relative in exp().
    assert_close(result.values, ref_values, "ensemble values", rtol=2e-5, atol=1e-6)
    assert_close(probs.gather(1, result.indices), result.values, "ensemble probs at indices",
                 rtol=2e-5, atol=1e-6)
    if k == classes:  # the sum over all classes of S softmaxes is S
        assert_close(result.values.sum(1), torch.full((rows,), 3.0), "Σ probs", rtol=1e-5)


# ----------------------------------------------------------------------------- memory


def largest_tensor_bytes(fn) -> int:
    with LargestTensor() as probe:
        fn()
    return probe.bytes


@pytest.mark.parametrize("op", ["cosine_topk", "step_ensemble_topk"])
def test_scoring_allocates_nothing_of_rows_times_classes(op):
    """C is large next to D and k, so an N×C fp32 score buffer, or per-tile candidates
    N×(C/16)×k, would exceed half the N×C bytes, which leaves room only for the table (C·D),
    the (N, k) outputs and O(S·N) statistics. The reference path, which builds N×C, is
    measured too, to show the probe sees such a buffer."""
    rows, classes, dim, k = 32, 257, 8, 10
    x, table = features(rows, classes, dim, seed=5)
    table = F.normalize(table, dim=-1)
    states = torch.stack([x, 2 * x + 1])

    def run(backend: str):
        if op == "cosine_topk":
            return dispatch.cosine_topk(x, table, k, normalized=True, backend=backend)
        return dispatch.step_ensemble_topk(states, table, k, normalized=True, backend=backend)

    bound = 4 * rows * classes // 2
    assert 4 * classes * dim < bound <= 4 * rows * (classes // 16) * k  # the test can tell
    used = largest_tensor_bytes(lambda: run("auto"))
    assert used < bound, f"{op}: a {used}-byte tensor was made (bound {bound})"
    assert largest_tensor_bytes(lambda: run("reference")) >= 4 * rows * classes, (
        "the probe missed the reference's N×C scores")


# --------------------------------------------------------------------------- tie rule


@pytest.mark.parametrize("classes", [13, 45])  # inside one 16-class tile; across three
def test_equal_cosines_go_to_the_lower_class_index_in_rank_order(classes):
    """About C/5 classes per row tie exactly (kernel_support.exact_ties): the kernel keeps the
    lower index among equal scores, when it picks inside a tile, when it evicts from its slots
    and when it orders the k it kept, for every k."""
    x, table, levels = exact_ties(classes, seed=classes)
    x, table = x.to(DEVICE), table.to(DEVICE)
    for k in sorted({1, 2, 3, 5, min(16, classes)}):
        result = dispatch.cosine_topk(x, table, k, normalized=True, backend="triton")
        expected = tie_rule_topk(levels, k)
        assert torch.equal(result.indices.cpu(), expected), (
            f"C={classes} k={k}: {result.indices.tolist()} != {expected.tolist()}")
        assert torch.equal(result.values.cpu(), levels.gather(1, expected)), f"k={k} values"


@pytest.mark.parametrize("classes", [13, 45])
def test_the_step_ensemble_kernel_keeps_the_same_tie_rule(classes):
    x, table, levels = exact_ties(classes, seed=100 + classes)
    x, table = x.to(DEVICE), table.to(DEVICE)
    # scale 10: level gaps of 0.25 stay far above fp32 rounding, and no probability underflows
    probs = reference.step_ensemble_probs(lambda f, t: torch.zeros_like(f), x, table, steps=2,
                                          ensemble_steps=(0, 2), logit_scale=10.0)
    for k in sorted({1, 2, 3, 5, min(16, classes)}):
        result = dispatch.step_ensemble_topk([x, x], table, k, logit_scale=10.0,
                                             normalized=True, backend="triton")
        expected = tie_rule_topk(levels, k)
        assert torch.equal(result.indices.cpu(), expected), (
            f"C={classes} k={k}: {result.indices.tolist()} != {expected.tolist()}")
        assert_close(result.values, probs.gather(1, expected.to(DEVICE)), f"k={k} values",
                     rtol=2e-5, atol=1e-6)
