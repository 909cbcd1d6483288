"""Bad input gets a clear ValueError/TypeError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fma_fast


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    model = fma_fast.VelocityNet(8, blocks=1)
    x = torch.randn(6, 8, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    z = torch.randn(3, 8, generator=generator)
    return model, x, labels, z


def fit(x, labels, z):
    return fma_fast.fit(x, labels, z, blocks=1, epochs=1, progress=False)


def test_feature_dim_must_match_model(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="features has dim 5 but the model expects 8"):
        fma_fast.solve(x[:, :5], model, 1)
    with pytest.raises(ValueError, match="image_features have dim 8 but model expects 4"):
        fma_fast.fit(x, labels, z, model=fma_fast.VelocityNet(4, 1), epochs=1, progress=False)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.tensor([0, 1, 2, 0, 1, 3]), ValueError, r"labels must lie in \[0, 3\)"),
        (torch.tensor([0, 1, 2, 0, 1, -1]), ValueError, r"labels must lie in \[0, 3\)"),
        (torch.tensor([0.0, 1, 2, 0, 1, 2]), TypeError, "labels must be an integer tensor"),
        (torch.tensor([0, 1, 2]), ValueError, "labels has 3 entries but the features have 6"),
    ],
)
def test_labels_are_checked(setup, bad, error, message):
    model, x, _, z = setup
    with pytest.raises(error, match=message):
        fit(x, bad, z)
    with pytest.raises(error, match=message):
        fma_fast.select_steps(model, x, bad, z, max_steps=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_are_refused(setup, value):
    model, x, labels, z = setup
    x = x.clone()
    x[4, 2] = value
    with pytest.raises(ValueError, match=r"features contains NaN or Inf \(first at row 4\)"):
        fma_fast.solve(x, model, 1)
    with pytest.raises(ValueError, match="image_features contains NaN or Inf"):
        fit(x, labels, z)
    z = z.clone()
    z[0, 0] = value
    with pytest.raises(ValueError, match="class_features contains NaN or Inf"):
        fma_fast.solve(setup[1], model, 1, class_features=z)


def test_empty_inputs_are_refused(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="features is empty"):
        fma_fast.solve(x[:0], model, 1)
    with pytest.raises(ValueError, match="image_features is empty"):
        fit(x[:0], labels[:0], z)
    with pytest.raises(ValueError, match="class_features is empty"):
        fma_fast.solve(x, model, 1, class_features=z[:0])


def test_class_features_of_wrong_dim(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="class_features has dim 7 but features expects 8"):
        fma_fast.solve(x, model, 1, class_features=z[:, :7])
    with pytest.raises(ValueError, match="class_features has dim 7 but image_features expects 8"):
        fit(x, labels, z[:, :7])


def test_features_must_be_2d_floating(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match=r"features must be 2-D \(rows, dim\), got shape \(48,\)"):
        fma_fast.solve(x.flatten(), model, 1)
    with pytest.raises(TypeError, match="features must be a floating-point tensor"):
        fma_fast.solve(x.long(), model, 1)
    with pytest.raises(TypeError, match="features must be a torch.Tensor or numpy.ndarray"):
        fma_fast.solve(x.tolist(), model, 1)


def test_steps_and_options(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        fma_fast.solve(x, model, -1)
    with pytest.raises(TypeError, match="steps must be an int"):
        fma_fast.solve(x, model, 1.5)
    with pytest.raises(ValueError, match="topk must be <= the number of classes 3"):
        fma_fast.solve(x, model, 1, class_features=z, topk=4)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        fma_fast.solve(x, model, 1, step_size=0.0)
    with pytest.raises(ValueError, match="noise must be one of"):
        fma_fast.fit(x, labels, z, noise="gaussian", epochs=1, progress=False)
    with pytest.warns(UserWarning, match="steps \\* step_size = 1.2 > 1"):
        fma_fast.solve(x, model, 12)


def test_tensors_on_different_devices(setup):
    model, x, labels, z = setup
    z_meta = z.to("meta")
    with pytest.raises(ValueError, match="same device: features on cpu, class_features on meta"):
        fma_fast.solve(x, model, 1, class_features=z_meta)
    with pytest.raises(ValueError, match="same device"):
        fit(x, labels.to("meta"), z)


def test_numpy_inputs_are_accepted(setup):
    model, x, labels, z = setup
    result = fma_fast.solve(x.numpy(), model, 2, class_features=np.asarray(z), topk=2)
    assert result.topk_indices.shape == (6, 2)
