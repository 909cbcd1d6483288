"""Sample-adaptive early stopping: the rules' limits, agreement with a per-row loop, chunking,
and the choice on val."""

from __future__ import annotations

import pytest
import torch
from support import randomize_parameters

from fma_fast import VelocityNet, reference
from fma_fast.experiments.adaptive import (
    DEFAULT_GRID,
    StopRule,
    adaptive_predict,
    select_rule,
    stop_steps,
    trajectory_stats,
)

MAX_STEPS = 6
STEP = 1.0 / MAX_STEPS


@pytest.fixture(scope="module")
def setup():
    """A random (non-zero) field strong enough that predictions change along the path."""
    generator = torch.Generator().manual_seed(0)
    dim, classes, rows = 16, 6, 64
    model = VelocityNet(dim, blocks=1).eval()
    randomize_parameters(model, seed=1, scale=0.3)
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    labels = torch.randint(classes, (rows,), generator=generator)
    stats = trajectory_stats(model, x, z, max_steps=MAX_STEPS, step_size=STEP)
    assert (stats.pred[:, 0] != stats.pred[:, -1]).any(), "the field must change predictions"
    return model, x, z, labels, stats


def _final_pred(model, x, z, steps):
    with torch.no_grad():
        return reference.cosine_topk(reference.euler_solve(model, x, steps, STEP), z)[1][:, 0]


def test_stats_match_the_reference_trajectory(setup):
    model, x, z, _, stats = setup
    for steps in (0, 3, MAX_STEPS):
        assert torch.equal(stats.pred[:, steps], _final_pred(model, x, z, steps))
    assert stats.max_steps == MAX_STEPS
    assert ((stats.prob > 0) & (stats.prob <= 1)).all() and (stats.margin >= 0).all()


def test_chunking_does_not_change_the_stats(setup):
    model, x, z, _, stats = setup
    chunked = trajectory_stats(model, x, z, max_steps=MAX_STEPS, step_size=STEP, batch_size=5)
    assert torch.equal(chunked.pred, stats.pred)
    torch.testing.assert_close(chunked.prob, stats.prob)
    torch.testing.assert_close(chunked.margin, stats.margin)


@pytest.mark.parametrize(
    "rule", [StopRule("prob", 0.0), StopRule("margin", 0.0), StopRule("stable", 0)]
)
def test_always_firing_rules_stop_every_row_at_step_0(setup, rule):
    model, x, z, _, stats = setup
    pred, steps = adaptive_predict(stats, rule)
    assert (steps == 0).all()
    assert torch.equal(pred, _final_pred(model, x, z, 0))


@pytest.mark.parametrize(
    "rule",
    [StopRule("prob", 1.01), StopRule("margin", 2.01), StopRule("stable", MAX_STEPS + 1)],
)
def test_never_firing_rules_equal_fixed_m_max(setup, rule):
    model, x, z, _, stats = setup
    pred, steps = adaptive_predict(stats, rule)
    assert (steps == MAX_STEPS).all()
    assert torch.equal(pred, _final_pred(model, x, z, MAX_STEPS))


def _brute_force(model, x, z, rule: StopRule) -> tuple[list[int], list[int]]:
    """Solve one row at a time, checking the rule after every step, and stop there."""
    preds, stops = [], []
    with torch.no_grad():
        for row in x:
            state, t, history = row[None], torch.zeros(()), []
            for step in range(MAX_STEPS + 1):
                cosine = reference.cosine_logits(state, z)[0]
                top = cosine.topk(2)
                history.append(int(top.indices[0]))
                fired = {
                    "prob": float(torch.softmax(100 * cosine, -1).max()) >= rule.threshold,
                    "margin": float(top.values[0] - top.values[1]) >= rule.threshold,
                    "stable": step >= rule.threshold
                    and len(set(history[step - int(rule.threshold) :])) == 1,
                }[rule.kind]
                if fired or step == MAX_STEPS:
                    break
                state, t = reference.euler_step(state, model(state, t), t, STEP)
            preds.append(history[-1])
            stops.append(step)
    return preds, stops


@pytest.mark.parametrize("kind", ["prob", "margin", "stable"])
def test_vectorised_rule_matches_a_per_row_loop(setup, kind):
    model, x, z, _, stats = setup
    if kind == "stable":
        rule = StopRule("stable", 2)
    else:  # a threshold from the data, so that rows stop at different steps: the middle of
        # the widest gap between the values of every row and step in their middle half, so
        # that rounding differences between the fast path and a one-row reference solve
        # cannot flip a ">="
        ordered = (stats.prob if kind == "prob" else stats.margin).flatten().sort().values
        quarter = len(ordered) // 4
        middle = ordered[quarter : 3 * quarter]
        gap = int((middle[1:] - middle[:-1]).argmax())
        rule = StopRule(kind, float(middle[gap] + middle[gap + 1]) / 2)
    pred, steps = adaptive_predict(stats, rule)
    assert len(set(steps.tolist())) >= 2, "the rule must stop rows at different steps"
    brute_pred, brute_steps = _brute_force(model, x, z, rule)
    assert steps.tolist() == brute_steps
    assert pred.tolist() == brute_pred


def test_stop_step_is_the_first_firing_step(setup):
    *_, stats = setup
    rule = StopRule("margin", float(stats.margin.median()))
    steps = stop_steps(stats, rule)
    fires = stats.margin >= rule.threshold
    for row in range(stats.pred.shape[0]):
        expected = int(fires[row].nonzero()[0]) if fires[row].any() else MAX_STEPS
        assert int(steps[row]) == expected


def test_select_rule_takes_the_best_val_accuracy_then_fewest_steps(setup):
    *_, labels, stats = setup
    selection = select_rule(stats, labels)
    assert len(selection.table) == len(DEFAULT_GRID)
    assert selection.accuracy == max(acc for _, acc, _, _ in selection.table)
    ties = [row for row in selection.table if row[1] == selection.accuracy]
    assert selection.mean_steps == min(steps for *_, steps in ties)
    pred, _ = adaptive_predict(stats, selection.rule)
    assert selection.accuracy == float((pred == labels).double().mean())
    # Two rules that never fire tie exactly: the first in grid order wins.
    never = [StopRule("prob", 2.0), StopRule("margin", 3.0)]
    assert select_rule(stats, labels, never).rule == never[0]


def test_select_rule_breaks_accuracy_ties_by_the_val_cross_entropy(setup):
    """With the labels' log-probabilities, equal accuracy goes to the lower cross-entropy at
    the rows' stopping steps (computed here from the per-step log-probabilities), not to the
    fewer steps."""
    model, x, z, labels, _ = setup
    stats = trajectory_stats(model, x, z, labels, max_steps=MAX_STEPS, step_size=STEP)
    never = StopRule("prob", 2.0)  # every row at MAX_STEPS
    at_once = StopRule("prob", 0.0)  # every row at step 0
    accuracy = stats.fixed_accuracy(labels)
    loss = (-stats.label_logprob.double().mean(dim=0)).tolist()
    with torch.no_grad():
        logits = 100 * reference.cosine_logits(
            reference.euler_solve(model, x, MAX_STEPS, STEP), z)
    expected_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert loss[MAX_STEPS] == pytest.approx(expected_loss, rel=1e-4, abs=1e-4)
    stats.pred[:, MAX_STEPS] = stats.pred[:, 0]  # equal accuracy at both ends
    selection = select_rule(stats, labels, [at_once, never])
    expected = never if loss[MAX_STEPS] < loss[0] else at_once
    assert selection.rule == expected, (accuracy, loss[0], loss[MAX_STEPS])


def test_fixed_accuracy_is_accuracy_per_m(setup):
    *_, labels, stats = setup
    accuracy = stats.fixed_accuracy(labels)
    assert len(accuracy) == MAX_STEPS + 1
    for steps in (0, MAX_STEPS):
        assert accuracy[steps] == float((stats.pred[:, steps] == labels).double().mean())


def test_bad_arguments_fail_clearly(setup):
    model, x, z, labels, stats = setup
    with pytest.raises(ValueError, match="kind"):
        StopRule("entropy", 0.5)
    with pytest.raises(TypeError, match="threshold"):
        StopRule("stable", 1.5)
    with pytest.raises(ValueError, match="threshold"):
        StopRule("prob", -0.1)
    with pytest.raises(TypeError, match="StopRule"):
        stop_steps(stats, ("prob", 0.5))
    with pytest.raises(ValueError, match="grid"):
        select_rule(stats, labels, [])
    with pytest.raises(ValueError, match="2 classes"):
        trajectory_stats(model, x, z[:1])
    with pytest.raises(ValueError, match="dim"):
        trajectory_stats(model, x, z[:, :8])
    with pytest.raises(TypeError, match="velocity"):
        trajectory_stats("model", x, z)
    with pytest.raises(ValueError, match="NaN"):
        trajectory_stats(model, torch.full_like(x, float("nan")), z)
    with pytest.raises(ValueError, match="entries"):
        stats.fixed_accuracy(labels[:-1])


def test_the_trajectory_and_the_sharded_solves_take_the_models_step_size():
    """Review item 6: trajectory_stats, solve_sharded and accuracy_by_steps_sharded used
    h=0.1 whatever the model carries (fma_fast.load sets model.steps / model.step_size), so
    with h=0.3 they gave other answers than solve and accuracy_by_steps."""
    from fma_fast import accuracy_by_steps, solve
    from fma_fast.solver.sharded import accuracy_by_steps_sharded, solve_sharded

    generator = torch.Generator().manual_seed(3)
    dim, classes, rows = 16, 5, 48
    model = VelocityNet(dim, blocks=1).eval()
    randomize_parameters(model, seed=2, scale=0.4)
    model.steps, model.step_size = 3, 0.3
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    labels = torch.randint(classes, (rows,), generator=generator)
    solved = solve(x, model, class_features=z, topk=2)
    at_default_h = solve(x, model, class_features=z, topk=2, step_size=0.1)
    assert not torch.equal(solved.topk_values, at_default_h.topk_values), "h must matter here"
    sharded = solve_sharded(x, model, model.steps, class_features=z, topk=2)
    assert torch.equal(sharded.topk_indices, solved.topk_indices)
    assert torch.equal(sharded.topk_values, solved.topk_values)
    curve = accuracy_by_steps(model, x, labels, z)
    assert len(curve) == 4  # M that reaches t=1 at h=0.3
    assert accuracy_by_steps_sharded(model, x, labels, z) == curve
    stats = trajectory_stats(model, x, z)
    assert stats.max_steps == 3
    assert stats.fixed_accuracy(labels) == curve
    assert torch.equal(stats.pred[:, model.steps], solved.pred)
