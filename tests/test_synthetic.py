"""The synthetic few-shot tasks: seeded, K-shot, CLIP-like geometry, difficulty that bites."""

from __future__ import annotations

import pytest
import torch

from fma_fast import reference, synthetic


def off_diagonal_mean(similarity: torch.Tensor) -> float:
    mask = ~torch.eye(similarity.shape[0], dtype=torch.bool)
    return float(similarity[mask].mean())


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_cosine_ranges_are_clip_like(difficulty):
    task = synthetic.make_task(difficulty=difficulty, seed=2, dim=256, test_per_class=20)
    x, z, y = task.test.features, task.class_features, task.test.labels
    matched = float((x * z[y]).sum(-1).mean())
    assert 0.2 <= matched <= 0.35, matched  # docs/method.md §7: matched image-text cos 0.25-0.35
    assert 0.4 <= off_diagonal_mean(x @ x.T) <= 0.9
    assert 0.6 <= off_diagonal_mean(z @ z.T) <= 0.9
    assert torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)


def test_shots_and_reproducibility():
    task = synthetic.make_task(num_classes=7, shots=3, test_per_class=5, seed=4, dim=32)
    assert torch.equal(torch.bincount(task.train.labels), torch.full((7,), 3))
    assert torch.equal(torch.bincount(task.val.labels), torch.full((7,), 3))  # min(K, 4)
    again = synthetic.make_task(num_classes=7, shots=3, test_per_class=5, seed=4, dim=32)
    assert torch.equal(task.train.features, again.train.features)
    other = synthetic.make_task(num_classes=7, shots=3, test_per_class=5, seed=5, dim=32)
    assert not torch.equal(task.train.features, other.train.features)


def test_difficulty_lowers_zero_shot_accuracy():
    accuracy = []
    for difficulty in (0.0, 0.5, 1.0):
        task = synthetic.make_task(difficulty=difficulty, seed=1, dim=256, test_per_class=30)
        pred = reference.cosine_logits(task.test.features, task.class_features).argmax(-1)
        accuracy.append(float((pred == task.test.labels).double().mean()))
    assert accuracy[0] > accuracy[1] > accuracy[2], accuracy


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty must lie in"):
        synthetic.make_task(difficulty=1.5)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        synthetic.make_task(num_classes=1)
