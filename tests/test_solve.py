"""solve / select_steps: streaming, results, and one trajectory pass for every M."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_parameters

import fma_fast
from fma_fast import reference


@pytest.fixture
def model() -> fma_fast.VelocityNet:
    net = fma_fast.VelocityNet(12, blocks=2)
    randomize_parameters(net, scale=0.2)
    return net


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(9)
    return torch.randn(37, 12, generator=generator), torch.randn(11, 12, generator=generator)


@pytest.mark.parametrize("batch_size", [1, 5, 37, 1000])
def test_chunked_solve_equals_one_pass(model, data, batch_size):
    x, z = data
    with torch.no_grad():
        expected = reference.euler_solve(model, x, 4)
    moved = fma_fast.solve(x, model, 4, batch_size=batch_size)
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-6)
    result = fma_fast.solve(x, model, 4, class_features=z, topk=3, batch_size=batch_size)
    values, indices = reference.cosine_topk(expected, z, 3)
    torch.testing.assert_close(result.topk_values, values, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.topk_indices, indices)
    assert torch.equal(result.pred, indices[:, 0])
    assert isinstance(result.path, str) and result.path


def test_topk_equal_to_class_count_sorts_every_class(model, data):
    x, z = data
    result = fma_fast.solve(x, model, 2, class_features=z, topk=z.shape[0])
    assert sorted(result.topk_indices[0].tolist()) == list(range(z.shape[0]))
    assert (result.topk_values[:, :-1] >= result.topk_values[:, 1:]).all()


def test_memory_mapped_numpy_features_stream(model, data, tmp_path):
    x, z = data
    path = tmp_path / "features.npy"
    np.save(path, x.numpy())
    mapped = np.load(path, mmap_mode="r+")
    result = fma_fast.solve(mapped, model, 3, class_features=z, batch_size=8)
    assert torch.equal(result.pred, fma_fast.solve(x, model, 3, class_features=z).pred)


def test_select_steps_matches_solving_each_m_separately(model, data):
    x, z = data
    labels = torch.arange(37) % 11
    selection = fma_fast.select_steps(model, x, labels, z, max_steps=6, batch_size=10)
    for steps in range(7):
        pred = fma_fast.solve(x, model, steps, class_features=z).pred
        assert selection.accuracy[steps] == pytest.approx(float((pred == labels).double().mean()))
    best = max(selection.accuracy)
    assert selection.best_steps == selection.accuracy.index(best)  # fewest steps among ties
    assert "<- best" in selection.table()


def test_any_velocity_module_can_be_solved(data):
    x, z = data

    def constant_field(features, t):
        return torch.ones_like(features)

    moved = fma_fast.solve(x, constant_field, 5, step_size=0.1)
    torch.testing.assert_close(moved, x + 0.5)
