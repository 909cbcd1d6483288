"""The folded solver plan and CPU path against ``reference.euler_solve``, the ground truth."""

from __future__ import annotations

import pytest
import torch
from support import (
    TOLERANCE,
    assert_states_close,
    random_net,
    randomize_parameters,
    reference_trajectory,
    unit_rows,
)

import fma_fast
from fma_fast import VelocityNet, reference, synthetic
from fma_fast.core import policy
from fma_fast.core.names import PRECISIONS
from fma_fast.solver import cpu as runtime_module
from fma_fast.solver import routing
from fma_fast.solver.cpu import folded_final, folded_solve, folded_states
from fma_fast.solver.plan import SolverPlan, build_plan, clear_plan_cache, solver_plan, step_times

# Share of test rows whose bf16 prediction must equal the fp32 one on a trained field.
BF16_AGREEMENT = 0.99


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize(
    ("dim", "blocks", "width", "rows"),
    [(48, 0, None, 5), (37, 1, 21, 1), (64, 3, 96, 77), (24, 2, 24, 130)],
)
def test_folded_trajectory_matches_reference(precision, dim, blocks, width, rows):
    net = random_net(dim, blocks, width)
    x = unit_rows(rows, dim)
    expected = reference_trajectory(net, x, 6, 0.1)
    # chunk_rows=32 makes 77 and 130 rows end in a partial chunk.
    got = folded_solve(net, x, 6, 0.1, precision=precision, return_trajectory=True, chunk_rows=32)
    where = f"{precision} D={dim} blocks={blocks} width={width} N={rows}"
    assert_states_close(got, expected, x, TOLERANCE[precision], where)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("dim", "blocks", "width", "rows", "chunk_rows", "workers"),
    [(48, 0, None, 5, 4096, 1), (37, 1, 21, 1, 4096, 2), (64, 3, 96, 301, 128, 2),
     (24, 2, 24, 130, 32, 1)],
)
def test_folded_final_matches_reference(precision, dim, blocks, width, rows, chunk_rows, workers):
    """The final-only path (merged final layer and input projection in fp32) vs the reference."""
    net = random_net(dim, blocks, width, seed=7)
    x = unit_rows(rows, dim)
    expected = reference_trajectory(net, x, 7, 0.1)[-1]
    got = folded_final(net, x, 7, 0.1, precision=precision, chunk_rows=chunk_rows,
                       workers=workers)
    where = f"final only, {precision} D={dim} blocks={blocks} width={width} N={rows}"
    assert_states_close([x, got], [x, expected], x, TOLERANCE[precision], where)


@pytest.mark.parametrize(
    ("steps", "step_size"),
    [(0, 0.1), (1, 0.1), (2, 0.1), (7, 0.1), (10, 0.1), (3, 0.05), (3, 1 / 3), (8, 0.125)],
)
def test_steps_and_step_sizes(steps, step_size):
    net = random_net(40, 2, 56, seed=3)
    x = unit_rows(9, 40)
    expected = reference_trajectory(net, x, steps, step_size)
    got = folded_solve(net, x, steps, step_size, return_trajectory=True)
    assert_states_close(got, expected, x, TOLERANCE["fp32"], f"M={steps} h={step_size}")
    final = folded_solve(net, x, steps, step_size)  # the merged final-only path
    if steps == 0:
        assert torch.equal(final, x), "M=0 must return the input features"
    else:
        assert_states_close([x, final], [x, expected[-1]], x, TOLERANCE["fp32"],
                            f"final only, M={steps} h={step_size}")


def test_released_size_network():
    """D=512, 12 blocks, M=10: the released default, where rounding accumulates most."""
    net = random_net(512, 12, seed=5)
    randomize_parameters(net, seed=5, scale=0.05)
    x = unit_rows(33, 512)
    expected = reference_trajectory(net, x, 10, 0.1)
    for precision, tolerance in TOLERANCE.items():
        got = folded_solve(net, x, 10, 0.1, precision=precision, return_trajectory=True)
        assert_states_close(got, expected, x, tolerance, f"{precision} D=512 blocks=12")


def test_times_accumulate_in_fp32_like_the_reference():
    t = torch.zeros((), dtype=torch.float32)
    for step, value in enumerate(step_times(10, 0.1).tolist()):
        assert value == float(t), f"step {step}: t={value!r}, the reference has {float(t)!r}"
        t = t + 0.1
    # fp32 accumulation drifts from i*h: t_7 is 0.70000005, not fp32(0.7) = 0.69999999.
    assert float(step_times(8, 0.1)[7]) != float(torch.tensor(0.7, dtype=torch.float32))


def test_plan_shapes_and_dtypes():
    net = random_net(37, 3, 21)
    plan = build_plan(net, 4, 0.1, dtype=torch.bfloat16)
    assert (plan.dim, plan.width, plan.blocks, plan.steps) == (37, 21, 3, 4)
    assert plan.w1.shape == plan.w2.shape == (4, 3, 21, 21)
    assert plan.wf.shape == (4, 21, 37) and plan.bf.shape == (4, 37)
    assert plan.dtype == torch.bfloat16
    assert plan.input_weight.dtype == plan.input_bias.dtype == torch.float32  # GPU path needs it
    assert plan.times.dtype == torch.float32


def test_hidden_state_with_a_large_mean():
    """The plan keeps the hidden state mean-free; LayerNorm must not care about a big offset."""
    net = random_net(32, 2, 40, seed=7)
    with torch.no_grad():
        net.input_proj.bias.add_(30.0)
        net.res_blocks[0].mlp[2].bias.sub_(10.0)
        net.res_blocks[0].adaLN_modulation[-1].bias[80:].add_(1.0)  # gate of block 0
    x = unit_rows(12, 32)
    expected = reference_trajectory(net, x, 5, 0.1)
    got = folded_solve(net, x, 5, 0.1, return_trajectory=True)
    assert_states_close(got, expected, x, TOLERANCE["fp32"], "hidden mean 30")


def test_states_reuse_one_buffer():
    net = random_net(16, 1)
    x = unit_rows(4, 16)
    states = folded_states(net, x, 3, 0.1)
    first = next(states)
    assert torch.equal(first, x) and first.data_ptr() != x.data_ptr(), "x_0 must be a copy of x"
    assert all(state is first for state in states), "folded_states should reuse its buffer"
    assert torch.equal(x, unit_rows(4, 16)), "the input was modified"


def test_empty_rows_and_dtype_of_input():
    net = random_net(16, 1)
    assert folded_solve(net, torch.zeros(0, 16), 3).shape == (0, 16)
    x = unit_rows(5, 16)
    from_double = folded_solve(net, x.double(), 3)
    assert from_double.dtype == torch.float32
    torch.testing.assert_close(from_double, folded_solve(net, x, 3), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- cache behaviour


def test_cache_hit_and_prefix_views():
    net = random_net(24, 2)
    plan = solver_plan(net, 6, 0.1)
    assert solver_plan(net, 6, 0.1) is plan, "same key must hit the cache"
    shorter = solver_plan(net, 4, 0.1)
    assert shorter.steps == 4 and shorter.w1.data_ptr() == plan.w1.data_ptr(), (
        "fewer steps at the same step size should be a view of the cached plan"
    )
    assert solver_plan(net, 6, 0.05) is not plan
    assert solver_plan(net, 6, 0.1, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert solver_plan(net, 6, 0.1) is plan, "other keys must not evict this one"
    longer = solver_plan(net, 8, 0.1)
    assert longer.steps == 8 and solver_plan(net, 8, 0.1) is longer


def test_prefix_plan_equals_built_plan():
    net = random_net(24, 2)
    long, short = build_plan(net, 7, 0.1), build_plan(net, 3, 0.1)
    for name in ("times", "w1", "b1", "w2", "b2", "wf", "bf"):
        assert torch.equal(getattr(long.prefix(3), name), getattr(short, name)), name


def _optimizer_step(kind: str):
    def change(net: VelocityNet) -> None:
        options = {"fused": True} if kind == "fused" else {"foreach": kind == "foreach"}
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, **options)
        x = unit_rows(6, net.dim, seed=5)
        net(x, torch.rand(6, 1)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return change


def _load_other(net: VelocityNet) -> None:
    net.load_state_dict(random_net(net.dim, net.blocks, seed=9).state_dict())


def _inplace(net: VelocityNet) -> None:
    with torch.no_grad():
        net.res_blocks[0].mlp[0].weight.mul_(1.5)


def _data_write(net: VelocityNet) -> None:
    net.final_layer.linear.bias.data.add_(0.5)  # bypasses autograd's version counter


def _data_rebind(net: VelocityNet) -> None:
    layer = net.res_blocks[1].adaLN_modulation[1]
    layer.weight.data = layer.weight.data * 0.5  # new storage behind the same Parameter


def _single_element(net: VelocityNet) -> None:
    with torch.no_grad():
        net.input_proj.weight.view(-1)[7] += 1e-3  # one element, a small change


WEIGHT_CHANGES = {
    "fused AdamW": _optimizer_step("fused"),
    "foreach AdamW": _optimizer_step("foreach"),
    "for-loop AdamW": _optimizer_step("for-loop"),
    "load_state_dict": _load_other,
    "in-place write": _inplace,
    "param.data write": _data_write,
    "param.data rebind": _data_rebind,
    "one element": _single_element,
}


@pytest.mark.parametrize("change", WEIGHT_CHANGES.values(), ids=WEIGHT_CHANGES.keys())
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_change_of_the_weights_reaches_the_solve(change, precision):
    """solve after a weight change equals a plain Euler loop on the new weights, whatever
    changed them; fused optimizers and ``.data`` writes do not bump the version counters."""
    if precision == "bf16" and not routing.cpu_bf16_units():
        pytest.skip("SKIPPED, not passed: solve refuses bf16 here (no BF16 units in effect)")
    net = random_net(24, 2)
    x = unit_rows(6, 24)
    stale = fma_fast.solve(x, net, 5, precision=precision)
    change(net)
    with torch.no_grad():
        expected = reference.euler_solve(net, x, 5, 0.1)
    moved = float((expected - stale).abs().max())
    assert moved > 1e-4, f"the change did not move the result ({moved:.3g}); test is void"
    got = fma_fast.solve(x, net, 5, precision=precision)
    error = float((got - expected).abs().max())
    assert error <= TOLERANCE[precision] * float((expected - x).abs().max()), (
        f"{precision}: solve is off by {error:.3g} after the change (it moved {moved:.3g}): "
        "a stale plan"
    )


def test_continued_training_with_fit_reaches_the_solve():
    """fit(model=m) trains with fused AdamW; the next solve must use the new weights."""
    task = synthetic.make_task(num_classes=4, dim=16, shots=4, difficulty=0.5, seed=3)
    data = (task.train.features, task.train.labels, task.class_features)
    net = fma_fast.fit(*data, blocks=1, epochs=2, seed=1, progress=False).model
    before = fma_fast.solve(task.test.features, net, 5)
    fma_fast.fit(*data, model=net, epochs=3, lr=1e-2, seed=2, progress=False)
    after = fma_fast.solve(task.test.features, net, 5)
    with torch.no_grad():
        expected = reference.euler_solve(net, task.test.features, 5, 0.1)
    assert float((expected - before).abs().max()) > 1e-3, "training did not change the field"
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_unchanged_weights_keep_the_cached_plan():
    net = random_net(24, 2)
    plan = solver_plan(net, 3, 0.1)
    net(unit_rows(2, 24), torch.rand(2, 1))  # a forward pass changes nothing
    assert solver_plan(net, 3, 0.1) is plan
    clear_plan_cache(net)
    assert solver_plan(net, 3, 0.1) is not plan


def test_inference_tensor_parameters_are_cached_and_checked():
    with torch.inference_mode():
        net = random_net(16, 1)
    x = unit_rows(3, 16)
    plan = solver_plan(net, 2, 0.1)
    assert solver_plan(net, 2, 0.1) is plan
    with torch.inference_mode():
        net.final_layer.linear.bias.add_(0.25)
        expected = reference.euler_solve(net, x, 2, 0.1, return_trajectory=True)
    assert solver_plan(net, 2, 0.1) is not plan
    got = folded_solve(net, x, 2, 0.1, return_trajectory=True)
    assert_states_close(got, expected, x, TOLERANCE["fp32"], "inference-tensor parameters")


# ------------------------------------------------------------------------- passing a plan


def test_plan_argument_matches_model_argument():
    net = random_net(24, 2)
    x = unit_rows(10, 24)
    plan = build_plan(net, 8, 0.1, final_only=True)
    assert torch.equal(folded_solve(plan, x, 8, 0.1), folded_solve(net, x, 8, 0.1))
    assert torch.equal(folded_solve(plan, x, 5, 0.1), folded_solve(net, x, 5, 0.1))
    states = build_plan(net, 8, 0.1)  # without the final-only fields: the states path
    assert not states.final_only and plan.final_only
    expected = folded_solve(net, x, 8, 0.1, return_trajectory=True)[-1]
    assert torch.equal(folded_solve(states, x, 8, 0.1), expected)


def test_final_only_fields_are_built_only_for_the_fp32_final_path():
    net = random_net(24, 2)
    x = unit_rows(4, 24)
    folded_states(net, x, 3, 0.1)
    folded_final(net, x, 3, 0.1, precision="bf16")
    assert not solver_plan(net, 3, 0.1).final_only, "states or bf16 built final-only fields"
    folded_final(net, x, 3, 0.1)
    assert solver_plan(net, 3, 0.1).final_only


@pytest.mark.parametrize(
    ("steps", "step_size", "precision", "match"),
    [(9, 0.1, "fp32", "up to 8 steps"), (8, 0.2, "fp32", "size 0.1"), (8, 0.1, "bf16", "bf16")],
)
def test_plan_argument_mismatch(steps, step_size, precision, match):
    plan = build_plan(random_net(24, 2), 8, 0.1)
    with pytest.raises(ValueError, match=match):
        folded_solve(plan, unit_rows(2, 24), steps, step_size, precision=precision)


def test_states_check_arguments_before_iterating():
    with pytest.raises(ValueError, match="dim 23"):
        folded_states(random_net(24, 2), unit_rows(2, 23), 2)  # no next() needed


def test_argument_errors():
    net = random_net(24, 2)
    with pytest.raises(ValueError, match="precision"):
        folded_solve(net, unit_rows(2, 24), 2, precision="int8")
    with pytest.raises(ValueError, match="dim 23"):
        folded_solve(net, unit_rows(2, 23), 2)
    with pytest.raises(ValueError, match="2-D"):
        folded_solve(net, torch.zeros(24), 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        folded_solve(net, unit_rows(2, 24), 2, chunk_rows=0)
    with pytest.raises(TypeError, match="VelocityNet"):
        folded_solve(torch.nn.Linear(2, 2), unit_rows(2, 2), 2)
    with pytest.raises(ValueError, match="step_size"):
        solver_plan(net, 2, 0.0)
    assert isinstance(solver_plan(net, 0, 0.1), SolverPlan)


# ------------------------------------------------------------------ CPU row workers


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "chunk_rows", "workers"), [(301, 128, 3), (130, 4096, 2)])
def test_workers_match_one_worker(precision, rows, chunk_rows, workers):
    """Row-parallel workers compute what one worker does, partial last chunk included."""
    net = random_net(40, 2, 56, seed=5)
    x = unit_rows(rows, 40)
    alone = folded_solve(net, x, 4, precision=precision, chunk_rows=chunk_rows, workers=1,
                         return_trajectory=True)
    shared = folded_solve(net, x, 4, precision=precision, chunk_rows=chunk_rows,
                          workers=workers, return_trajectory=True)
    where = f"{precision} N={rows} chunk_rows={chunk_rows} workers={workers}"
    assert_states_close(shared, alone, x, 1e-6, where)


@pytest.mark.parametrize(("rows", "chunk", "workers"), [(1, 64, 4), (300, 64, 2), (1000, 4096, 3),
                                                         (257, 128, 2), (4096, 1024, 2)])
def test_row_chunks_cover_every_row_once(rows, chunk, workers):
    chunks = runtime_module._row_chunks(rows, chunk, workers)
    covered = torch.cat([torch.arange(rows)[piece] for piece in chunks])
    assert torch.equal(covered, torch.arange(rows)), f"{chunks} do not tile {rows} rows"
    sizes = [piece.stop - piece.start for piece in chunks]
    assert max(sizes) <= chunk, f"a chunk exceeds chunk_rows={chunk}: {sizes}"
    if rows >= workers * policy.MIN_WORKER_ROWS:
        assert len(chunks) >= workers, f"{workers} workers but only {len(chunks)} chunks"


def test_workers_restore_the_thread_count_even_on_error(monkeypatch):
    net, x = random_net(24, 2), unit_rows(300, 24)
    before = torch.get_num_threads()
    folded_solve(net, x, 2, workers=2, chunk_rows=128)
    assert torch.get_num_threads() == before, "intra-op threads not restored after a solve"

    def broken_step(*args):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(runtime_module, "_blocks", broken_step)
    with pytest.raises(RuntimeError, match="worker failed"):
        folded_solve(net, x, 2, workers=2, chunk_rows=128)
    assert torch.get_num_threads() == before, "intra-op threads not restored after an error"


def test_workers_run_under_the_callers_inference_mode():
    """Workers are other threads, where inference mode is off unless passed on."""
    net, x = random_net(24, 2), unit_rows(300, 24)
    expected = folded_solve(net, x, 3, workers=1)
    with torch.inference_mode():
        got = folded_solve(net, x, 3, workers=2, chunk_rows=128)
    assert_states_close([x, got], [x, expected], x, 1e-6, "inference mode, 2 workers")


def test_workers_argument():
    with pytest.raises(ValueError, match="workers"):
        folded_solve(random_net(24, 2), unit_rows(2, 24), 2, workers=0)


# ------------------------------------------------------------------ released checkpoint


def test_official_checkpoint_golden(official_fixture, golden):
    """The released code's own outputs, from one trajectory pass for every M = 0..10."""
    model = fma_fast.load_official(official_fixture)
    trajectory = folded_solve(model, golden["x"], 10, golden["step_size"], return_trajectory=True)
    for steps in (5, 10):
        expected = golden[f"features_after_{steps}_steps"]
        error = float((trajectory[steps] - expected).norm() / (expected - golden["x"]).norm())
        assert error < TOLERANCE["fp32"], f"M={steps}: relative error {error:.3g}"
    for steps, state in enumerate(trajectory):
        pred = reference.cosine_logits(state, golden["class_features"]).argmax(dim=-1)
        mismatched = (pred != golden["preds_by_steps"][steps]).nonzero().flatten().tolist()
        assert not mismatched, f"M={steps}: rows {mismatched} differ from the released code"


# ------------------------------------------------------------ bf16 on a trained field


def test_bf16_predictions_agree_with_fp32_on_a_trained_field():
    task = synthetic.make_task(num_classes=10, dim=512, shots=8, test_per_class=60, seed=4)
    fitted = fma_fast.fit(task.train.features, task.train.labels, task.class_features,
                          blocks=2, epochs=15, device="cpu", progress=False, seed=4)
    x, z = task.test.features, task.class_features
    fp32 = folded_solve(fitted.model, x, 10, 0.1, return_trajectory=True)
    bf16 = folded_solve(fitted.model, x, 10, 0.1, precision="bf16", return_trajectory=True)
    assert float((fp32[10] - x).norm() / x.norm()) > 0.1, "the trained field barely moves x"
    for steps in range(1, 11):
        agree = float((reference.cosine_logits(fp32[steps], z).argmax(-1)
                       == reference.cosine_logits(bf16[steps], z).argmax(-1)).float().mean())
        assert agree >= BF16_AGREEMENT, f"M={steps}: bf16 agrees with fp32 on {agree:.2%} of rows"
