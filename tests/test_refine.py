"""fma_fast.refine: training a fitted field through its solve, its records and checks, and the
train/run options that expose it."""

from __future__ import annotations

import json

import pytest
import torch

import fma_fast
from fma_fast.cli import main
from fma_fast.experiments import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task() -> synthetic.FewShotTask:
    return synthetic.make_task(num_classes=5, dim=16, shots=4, test_per_class=6,
                               difficulty=0.8, seed=3)


@pytest.fixture(scope="module")
def fitted(task) -> fma_fast.FitResult:
    """A briefly trained field: its solve still misclassifies, so the loss has room."""
    return fma_fast.fit(task.train.features, task.train.labels, task.class_features,
                        blocks=1, epochs=4, lr=1e-3, seed=1, progress=False)


def _refine(task, fitted, **options):
    settings = {"steps": 4, "epochs": 6, "lr": 1e-3, "batch_size": 8, "progress": False}
    return fma_fast.refine(fitted.model, task.train.features, task.train.labels,
                           task.class_features, **{**settings, **options})


def _loss(model, task, steps: int) -> float:
    moved = fma_fast.solve(task.train.features, model, steps, differentiable=True)
    loss = fma_fast.cosine_cross_entropy(moved, task.class_features, task.train.labels)
    return float(loss.detach())


def test_refinement_lowers_the_loss_and_leaves_the_fitted_model_alone(task, fitted):
    before = {k: v.clone() for k, v in fitted.model.state_dict().items()}
    result = _refine(task, fitted)
    assert all(torch.equal(v, fitted.model.state_dict()[k]) for k, v in before.items())
    assert result.model is not fitted.model
    assert _loss(result.model, task, 4) < 0.8 * _loss(fitted.model, task, 4)
    assert result.history[-1] < result.history[0]
    assert len(result.history) == 6
    assert len(result.learning_rates) == result.config["optimizer_steps"] == 6 * 3  # 20 rows / 8
    assert result.learning_rates[0] == pytest.approx(1e-3)
    assert result.learning_rates == sorted(result.learning_rates, reverse=True)
    assert result.config["steps"] == 4 and result.config["objective"] == "cosine-cross-entropy"
    assert not result.model.training


def test_same_seed_same_refinement_other_seed_differs(task, fitted):
    first, again, other = (_refine(task, fitted, epochs=2, seed=s) for s in (5, 5, 6))
    state = first.model.state_dict()
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in state.items())
    assert not all(torch.equal(v, other.model.state_dict()[k]) for k, v in state.items())


def test_weights_on_the_last_state_alone_are_the_plain_loss(task, fitted):
    """step_weights run the trajectory output of the solve's Function; all weight on x_M is
    the same training as without weights."""
    plain = _refine(task, fitted, epochs=2)
    weighted = _refine(task, fitted, epochs=2, step_weights=[0, 0, 0, 1])
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(weighted.model.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    spread = _refine(task, fitted, epochs=2, step_weights=[1, 1, 1, 1])
    assert not torch.allclose(spread.model.final_layer.linear.weight,
                              plain.model.final_layer.linear.weight)
    assert spread.config["step_weights"] == [1.0, 1.0, 1.0, 1.0]


def test_checks(task, fitted):
    x, y, z = task.train.features, task.train.labels, task.class_features
    cases = [
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"step_weights": [1, 1]}, ValueError, "step_weights must hold 4 weights"),
        ({"step_weights": [0, 0, 0, 0]}, ValueError, "positive sum"),
        ({"step_weights": [1, -1, 1, 1]}, ValueError, "step_weights must be a finite number"),
        ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"backend": "compiled", "precision": "bf16"}, ValueError, "compiled"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fma_fast.refine(fitted.model, x, y, z, **{"steps": 4, **options})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        fma_fast.refine(fitted.model, x, y + 5, z, steps=2)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        fma_fast.refine(fitted.model, bad, y, z, steps=2)
    with pytest.raises(TypeError, match="one \\(C, D\\) class table"):
        fma_fast.refine(fitted.model, x, y, fma_fast.PerRowClasses(z.expand(len(x), -1, -1)),
                        steps=2)
    with pytest.raises(TypeError, match="fitted VelocityNet"):
        fma_fast.refine(lambda f, t: f, x, y, z, steps=2)


def test_train_refines_at_the_m_chosen_on_val_and_records_it(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", "--out", str(data), "--classes", "5", "--dim", "16", "--shots", "4"])
    common = [str(data / "train.safetensors"), "--val", str(data / "val.safetensors"),
              "--blocks", "1", "--epochs", "10", "--lr", "1e-3", "--max-steps", "3", "--quiet"]
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--refine-epochs", "2",
                 "--refine-lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    refinement = config["training"]["refinement"]
    assert refinement["epochs"] == 2 and refinement["lr"] == 1e-3, refinement
    assert f"refined at M={refinement['steps']}" in out and refinement["steps"] >= 1
    assert config["training"]["epochs"] == 10  # the fit's record is kept beside it
    assert main(["train", *common[:1], "--out", str(tmp_path / "no-val"),
                 "--refine-epochs", "1"]) == 2
    assert "--refine-epochs needs --val" in capsys.readouterr().err


def test_train_records_a_refinement_skipped_at_m0(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", "--out", str(data), "--classes", "4", "--dim", "16", "--shots", "2"])
    assert main(["train", str(data / "train.safetensors"), "--val",
                 str(data / "val.safetensors"), "--blocks", "1", "--epochs", "2", "--lr", "1e-2",
                 "--max-steps", "3", "--quiet", "--out", str(tmp_path / "run"),
                 "--refine-epochs", "2"]) == 0
    assert "M=0 chosen on val" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["steps"] == 0
    assert config["training"]["refinement"] == {"skipped": "M=0 chosen on val"}


def test_every_optimizer_step_runs_at_its_recorded_rate(task, fitted, monkeypatch):
    used = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    result = _refine(task, fitted, epochs=3)
    assert used == result.learning_rates and len(used) == 9
    assert used[0] == pytest.approx(1e-3) and used[-1] < 0.05 * used[0]
