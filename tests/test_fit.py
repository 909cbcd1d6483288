"""Training: the loss falls, runs are reproducible, and on a hard task FMA helps at the chosen M."""

from __future__ import annotations

import pytest
import torch

import fma_fast
from fma_fast import synthetic
from fma_fast.training import lr_factor


@pytest.fixture(scope="module")
def hard_task() -> synthetic.FewShotTask:
    return synthetic.make_task(
        num_classes=10, dim=64, shots=8, difficulty=0.9, test_per_class=40, seed=3
    )


@pytest.fixture(scope="module")
def trained(hard_task) -> fma_fast.FitResult:
    return fma_fast.fit(
        hard_task.train.features,
        hard_task.train.labels,
        hard_task.class_features,
        blocks=2,
        epochs=40,
        gamma=0.05,
        seed=5,
        progress=False,
    )


def test_loss_falls(trained):
    history = trained.history
    assert len(history) == 40
    assert history[-1] < 0.9 * history[0], f"loss went {history[0]:.4f} -> {history[-1]:.4f}"


def test_fma_beats_zero_shot_at_the_m_chosen_on_val(hard_task, trained):
    selection = fma_fast.select_steps(
        trained.model, hard_task.val.features, hard_task.val.labels, hard_task.class_features
    )
    test = fma_fast.accuracy_by_steps(
        trained.model, hard_task.test.features, hard_task.test.labels, hard_task.class_features
    )
    chosen = selection.best_steps
    print(f"test accuracy M=0 {test[0]:.4f}, M={chosen} (val) {test[chosen]:.4f}")
    assert chosen > 0, f"val chose M=0: {selection.accuracy}"
    assert test[chosen] > test[0], f"test accuracy per M: {test}"


def test_same_seed_same_model_other_seed_differs(hard_task):
    def run(seed):
        return fma_fast.fit(
            hard_task.train.features[:40],
            hard_task.train.labels[:40],
            hard_task.class_features,
            blocks=1,
            epochs=2,
            gamma=0.1,
            seed=seed,
            progress=False,
        )

    first, again, other = run(7), run(7), run(8)
    assert first.history == again.history
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[key]), key
    assert first.history != other.history


def test_endpoint_noise_form_trains(hard_task):
    result = fma_fast.fit(
        hard_task.train.features,
        hard_task.train.labels,
        hard_task.class_features,
        blocks=1,
        epochs=5,
        gamma=1.0,
        noise="endpoint",
        progress=False,
    )
    assert result.config["noise"] == "endpoint" and all(
        map(torch.isfinite, map(torch.tensor, result.history))
    )


def test_fit_continues_from_a_given_model(hard_task, trained):
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    result = fma_fast.fit(
        hard_task.train.features,
        hard_task.train.labels,
        hard_task.class_features,
        model=trained.model,
        epochs=1,
        progress=False,
    )
    assert result.model is trained.model
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [lr_factor(step, 10, 110) for step in range(110)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(110, 10, 110) == pytest.approx(0.0)


def test_fused_triton_training_matches_the_reference_loss_curve(hard_task):
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("SKIPPED, not passed: the Triton backend needs CUDA or TRITON_INTERPRET=1")
    # Philox (Triton) and torch.Generator noise differ, so compare at gamma=0 where the
    # target is deterministic: same batches, same t, same model -> same losses.
    runs = [fma_fast.fit(hard_task.train.features[:24], hard_task.train.labels[:24],
                         hard_task.class_features, blocks=1, epochs=2, batch_size=8,
                         gamma=0.0, seed=2, backend=backend, progress=False)
            for backend in ("reference", "triton")]
    assert runs[0].config["path"] == "reference"
    assert runs[1].config["path"].startswith("triton")
    assert runs[1].history == pytest.approx(runs[0].history, rel=1e-5)


@pytest.mark.parametrize("noise", ["bridge", "endpoint"])
def test_fit_leaves_the_callers_tensors_untouched(noise):
    """Features and class table that require grad get no .grad, keep their values, and the
    trained model carries no graph back to them."""
    task = synthetic.make_task(num_classes=3, dim=8, shots=4, difficulty=0.5, seed=2)
    features = task.train.features.clone().requires_grad_(True)
    table = task.class_features.clone().requires_grad_(True)
    labels = task.train.labels.clone()
    copies = [t.detach().clone() for t in (features, table, labels)]
    fma_fast.fit(features, labels, table, blocks=1, epochs=2, gamma=0.1, noise=noise,
                 progress=False)
    for name, tensor, copy in zip(("features", "class table", "labels"),
                                  (features, table, labels), copies):
        assert tensor.grad is None, f"fit wrote .grad into the caller's {name}"
        assert torch.equal(tensor.detach(), copy), f"fit changed the caller's {name}"
