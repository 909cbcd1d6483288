"""Baselines on frozen features: they learn, they are deterministic, Tip-Adapter's formula is
right, val selection depends on val, FMA plugs in, and bad arguments fail clearly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fma_fast import synthetic
from fma_fast.experiments.baselines import (
    FMA,
    ClipAdapter,
    LinearProbe,
    Pipeline,
    TipAdapter,
    TipAdapterF,
    ZeroShot,
    tip_adapter_logits,
)

CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return synthetic.make_task(
        num_classes=CLASSES, dim=32, shots=8, test_per_class=40, difficulty=0.5, seed=0
    )


def _fit(method, task):
    return method.fit(
        task.train.features,
        task.train.labels,
        task.class_features,
        task.val.features,
        task.val.labels,
    )


def _accuracy(method, task) -> float:
    return method.accuracy(task.test.features, task.test.labels)


FAST = {
    "zero-shot": lambda: ZeroShot(),
    "linear probe": lambda: LinearProbe(l2_grid=(1e-3, 1e-1), max_iter=50),
    "CLIP-Adapter": lambda: ClipAdapter(alpha_grid=(0.2, 0.6), iterations=40),
    "Tip-Adapter": lambda: TipAdapter(alpha_grid=(1.0, 10.0), beta_grid=(2.0, 7.0)),
    "Tip-Adapter-F": lambda: TipAdapterF(alpha_grid=(1.0, 10.0), beta_grid=(2.0, 7.0)),
}


@pytest.mark.parametrize("name", FAST)
def test_every_baseline_beats_chance(task, name):
    accuracy = _accuracy(_fit(FAST[name](), task), task)
    assert accuracy > 2 / CLASSES, f"{name}: {accuracy:.3f} is near chance {1 / CLASSES}"


@pytest.mark.parametrize("name", ["linear probe", "CLIP-Adapter", "Tip-Adapter-F"])
def test_learned_baselines_beat_zero_shot_with_8_shots(task, name):
    # The synthetic task entangles classes so that zero-shot is fooled; 8 labelled shots fix it.
    assert _accuracy(_fit(FAST[name](), task), task) > _accuracy(_fit(ZeroShot(), task), task)


@pytest.mark.parametrize("name", FAST)
def test_same_inputs_give_identical_logits(task, name):
    first = _fit(FAST[name](), task).logits(task.test.features)
    second = _fit(FAST[name](), task).logits(task.test.features)
    assert torch.equal(first, second)


def test_clip_adapter_draws_its_initialisation_from_the_seed(task):
    one = _fit(ClipAdapter(alpha_grid=(0.5,), iterations=5, seed=1), task)
    two = _fit(ClipAdapter(alpha_grid=(0.5,), iterations=5, seed=2), task)
    assert not torch.equal(one.logits(task.test.features), two.logits(task.test.features))


def test_adapters_trained_side_by_side_equal_one_run_per_alpha(task):
    both = _fit(ClipAdapter(alpha_grid=(0.2, 0.6), iterations=30), task)
    alone = _fit(ClipAdapter(alpha_grid=(both.alpha,), iterations=30), task)
    torch.testing.assert_close(
        both.transform(task.test.features), alone.transform(task.test.features)
    )


def test_clip_adapter_is_the_released_adapter(task):
    """Guards the adapter drifting from the released CLIP-Adapter: both ReLUs (the second
    after the up-projection), ratio 0.2 by default, then normalised; written out here."""
    adapter = _fit(ClipAdapter(iterations=5), task)
    assert adapter.alpha == 0.2 and adapter.selection == {"alpha": 0.2}
    x = F.normalize(task.test.features, dim=-1)
    mlp = torch.relu(torch.relu(x @ adapter.w1) @ adapter.w2)
    torch.testing.assert_close(adapter.transform(task.test.features),
                               F.normalize(0.2 * mlp + 0.8 * x, dim=-1))
    assert bool((torch.relu(x @ adapter.w1) @ adapter.w2 < 0).any())  # the last ReLU acts


def test_zero_shot_is_argmax_cosine(task):
    pred = _fit(ZeroShot(), task).predict(task.test.features)
    cosine = F.normalize(task.test.features, dim=-1) @ F.normalize(task.class_features, dim=-1).T
    assert torch.equal(pred, cosine.argmax(dim=-1))


def test_tip_adapter_formula_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # key 0 is class 1, key 1 is class 0
    alpha, beta = 2.0, 3.0
    logits = tip_adapter_logits(x, z, keys, values, alpha, beta)
    # Row 0: cos to classes (1, 0); affinity to keys (0, 0.8).
    row0 = [100 * 1 + alpha * math.exp(-beta * 0.2), 100 * 0 + alpha * math.exp(-beta * 1.0)]
    # Row 1: cos to classes (0.6, 0.8); affinity to keys (0.8, 0.96).
    row1 = [
        100 * 0.6 + alpha * math.exp(-beta * (1 - 0.96)),
        100 * 0.8 + alpha * math.exp(-beta * 0.2),
    ]
    torch.testing.assert_close(logits, torch.tensor([row0, row1]))


def test_tip_adapter_uses_the_shots_as_cache_and_the_chosen_alpha_beta(task):
    tip = _fit(TipAdapter(alpha_grid=(0.5, 5.0), beta_grid=(1.0, 4.0)), task)
    assert len(tip.val_table) == 4
    x = F.normalize(task.test.features, dim=-1)
    expected = tip_adapter_logits(
        x,
        F.normalize(task.class_features, dim=-1),
        F.normalize(task.train.features, dim=-1),
        F.one_hot(task.train.labels, CLASSES).float(),
        tip.selection["alpha"],
        tip.selection["beta"],
    )
    torch.testing.assert_close(tip.logits(task.test.features), expected)


def test_tip_adapter_f_moves_the_keys(task):
    tuned = _fit(TipAdapterF(alpha_grid=(1.0,), beta_grid=(4.0,), iterations=20), task)
    assert not torch.allclose(tuned.keys, F.normalize(task.train.features, dim=-1))


def test_selection_is_the_best_val_entry(task):
    probe = _fit(LinearProbe(l2_grid=(1e-4, 1e-2, 1.0), max_iter=50), task)
    scores = [score for _, score in probe.val_table]
    assert probe.selection == probe.val_table[scores.index(max(scores))][0]


def test_regularisation_chosen_on_val_follows_the_val_data():
    """Easy, separable data: every l2 classifies val perfectly, so the most confident (weakest
    l2) has the lowest val loss. Val labels shifted by one class: every l2 gets 0 accuracy, so
    the least confident (strongest l2) wins. Same train data, different choice."""
    easy = synthetic.make_task(num_classes=CLASSES, dim=32, shots=8, difficulty=0.0, seed=3)
    grid = (1e-4, 1e-2, 1.0)

    def chosen(val_labels) -> float:
        probe = LinearProbe(l2_grid=grid, max_iter=100).fit(
            easy.train.features,
            easy.train.labels,
            easy.class_features,
            easy.val.features,
            val_labels,
        )
        return probe.selection["l2"]

    truthful = chosen(easy.val.labels)
    misleading = chosen((easy.val.labels + 1) % CLASSES)
    assert truthful < misleading
    assert (truthful, misleading) == (grid[0], grid[-1])


def test_fma_plugs_in_after_clip_adapter(task):
    adapter = _fit(ClipAdapter(alpha_grid=(0.4,), iterations=20), task)
    # M=0 leaves the adapted features where they are: CLIP-Adapter + FMA(M=0) is CLIP-Adapter.
    stacked = _fit(Pipeline(adapter, FMA(blocks=1, epochs=1, max_steps=0), fit_first=False), task)
    assert torch.equal(stacked.predict(task.test.features), adapter.predict(task.test.features))
    assert stacked.selection == {"alpha": 0.4, "steps": 0}


def test_fma_classifier_chooses_m_on_val_and_matches_solve(task):
    fma = _fit(FMA(blocks=1, epochs=3, max_steps=3, step_size=0.25, seed=2), task)
    assert fma.selection["steps"] == fma.steps_selection.best_steps
    assert 0 <= fma.steps <= 3
    moved = F.normalize(fma.transform(task.test.features), dim=-1)
    cosine = moved @ F.normalize(task.class_features, dim=-1).T
    assert torch.equal(fma.predict(task.test.features), cosine.argmax(dim=-1))


def test_method_on_fma_features_uses_the_fitted_fma(task):
    fma = _fit(FMA(blocks=1, epochs=2, max_steps=2, step_size=0.5), task)
    tip = _fit(
        Pipeline(fma, TipAdapter(alpha_grid=(1.0,), beta_grid=(4.0,)), fit_first=False), task
    )
    direct = TipAdapter(alpha_grid=(1.0,), beta_grid=(4.0,)).fit(
        fma.transform(task.train.features), task.train.labels, task.class_features
    )
    torch.testing.assert_close(
        tip.logits(task.test.features), direct.logits(fma.transform(task.test.features))
    )


def test_unfitted_first_method_is_refused(task):
    with pytest.raises(RuntimeError, match="fitted"):
        _fit(Pipeline(FMA(), ZeroShot(), fit_first=False), task)
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearProbe().predict(task.test.features)
    with pytest.raises(RuntimeError, match="not fitted"):
        ZeroShot().accuracy(task.test.features, task.test.labels)


def test_bad_arguments_fail_clearly(task):
    with pytest.raises(ValueError, match="l2_grid"):
        LinearProbe(l2_grid=())
    with pytest.raises(ValueError, match="alpha_grid"):
        ClipAdapter(alpha_grid=(1.5,))
    with pytest.raises(ValueError, match="beta_grid"):
        TipAdapter(beta_grid=(-1.0,))
    with pytest.raises(TypeError, match="iterations"):
        TipAdapterF(iterations=2.5)
    with pytest.raises(ValueError, match="val_features"):
        LinearProbe().fit(task.train.features, task.train.labels, task.class_features)
    with pytest.raises(ValueError, match="both"):
        ZeroShot().fit(
            task.train.features, task.train.labels, task.class_features, task.val.features
        )
    with pytest.raises(ValueError, match="labels must lie"):
        ZeroShot().fit(task.train.features, task.train.labels + CLASSES, task.class_features)
    with pytest.raises(ValueError, match="class_features has dim"):
        ZeroShot().fit(task.train.features, task.train.labels, task.class_features[:, :8])
    with pytest.raises(TypeError, match="transform"):
        Pipeline(ZeroShot(), LinearProbe())
