"""The reference ops against their defining formulas and the properties the method relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import randomize_parameters

import fma_fast
from fma_fast import reference


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("steps", [0, 1, 3, 10])
def test_zero_initialised_field_leaves_features_unchanged(generator, steps):
    model = fma_fast.VelocityNet(33, blocks=2)
    x = torch.randn(7, 33, generator=generator)
    z = torch.randn(5, 33, generator=generator)
    assert torch.equal(fma_fast.solve(x, model, steps), x)
    at_m = fma_fast.solve(x, model, steps, class_features=z, topk=3)
    at_zero = fma_fast.solve(x, model, 0, class_features=z, topk=3)
    assert torch.equal(at_m.topk_indices, at_zero.topk_indices)


def test_bridge_pair_without_noise_is_the_straight_line(generator):
    x0, z = torch.randn(9, 6, generator=generator), torch.randn(9, 6, generator=generator)
    t = torch.rand(9, generator=generator)
    x_t, target = reference.bridge_pair(x0, z, t, torch.randn(9, 6, generator=generator), 0.0)
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * z)
    torch.testing.assert_close(target, z - x0)


def test_endpoint_target_points_at_the_class_text(generator):
    x0, z = torch.randn(9, 6, generator=generator), torch.randn(9, 6, generator=generator)
    t, noise = torch.rand(9, 1, generator=generator), torch.randn(9, 6, generator=generator)
    std = torch.rand(6, generator=generator)
    x_t, target = reference.training_pair(
        x0, z, t, noise, gamma=0.5, form="endpoint", feature_std=std
    )
    t = reference.clamp_time(t)
    torch.testing.assert_close(x_t + (1 - t) * target, z)  # one straight step lands on z
    torch.testing.assert_close(x_t - (1 - t) * x0 - t * z, (t * (1 - t)).sqrt() * 0.5 * std * noise)


@pytest.mark.parametrize("form", ["bridge", "endpoint"])
def test_time_is_clamped_so_targets_stay_finite_at_0_and_1(form, generator):
    x0, z = torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)
    x_t, target = reference.training_pair(
        x0,
        z,
        torch.tensor([0.0, 1.0]),
        torch.randn(2, 4, generator=generator),
        gamma=0.1,
        form=form,
        feature_std=torch.ones(4),
    )
    assert torch.isfinite(x_t).all() and torch.isfinite(target).all()


def test_training_pair_rejects_unknown_form_and_missing_std(generator):
    x = torch.randn(2, 4, generator=generator)
    with pytest.raises(ValueError, match="form must be one of"):
        reference.training_pair(x, x, torch.rand(2), x, gamma=0.1, form="ddpm")
    with pytest.raises(ValueError, match="feature_std"):
        reference.training_pair(x, x, torch.rand(2), x, gamma=0.1, form="endpoint")


def test_loss_is_mean_over_rows_of_sum_over_dims(generator):
    pred, target = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    expected = sum(((pred[i] - target[i]) ** 2).sum() for i in range(5)) / 5
    torch.testing.assert_close(reference.flow_matching_loss(pred, target), expected)


def test_loss_gradients_pass_gradcheck(generator):
    pred = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda p: reference.flow_matching_loss(p, target), (pred,))


def test_cosine_scoring_ignores_norms_and_ranks(generator):
    x, z = torch.randn(6, 5, generator=generator), torch.randn(4, 5, generator=generator)
    scaled = reference.cosine_logits(3.0 * x, 0.5 * z)
    torch.testing.assert_close(scaled, F.cosine_similarity(x[:, None], z[None], dim=-1))
    values, indices = reference.cosine_topk(x, z, 4)
    assert (values[:, :-1] >= values[:, 1:]).all()
    torch.testing.assert_close(scaled.gather(1, indices), values)


def test_step_ensemble_is_the_sum_of_softmax_at_chosen_steps(generator):
    model = fma_fast.VelocityNet(8, blocks=1)
    randomize_parameters(model)
    x, z = torch.randn(5, 8, generator=generator), torch.randn(3, 8, generator=generator)
    with torch.no_grad():
        probs = reference.step_ensemble_probs(model, x, z, steps=6, ensemble_steps=(0, 2, 6))
        states = reference.euler_solve(model, x, 6, return_trajectory=True)
    expected = sum(
        torch.softmax(100 * reference.cosine_logits(states[s], z), -1) for s in (0, 2, 6)
    )
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.full((5,), 3.0))
    with pytest.raises(ValueError, match="ensemble_steps"):
        reference.step_ensemble_probs(model, x, z, steps=4, ensemble_steps=(0, 8))


def test_euler_trajectory_ends_at_the_solution(generator):
    model = fma_fast.VelocityNet(8, blocks=2)
    randomize_parameters(model)
    x = torch.randn(3, 8, generator=generator)
    with torch.no_grad():
        path = reference.euler_solve(model, x, 4, 0.2, return_trajectory=True)
        final = reference.euler_solve(model, x, 4, 0.2)
        manual = x + 0.2 * model(x, torch.tensor(0.0))
    assert len(path) == 5 and torch.equal(path[0], x) and torch.equal(path[-1], final)
    torch.testing.assert_close(path[1], manual)
