"""``fit(schedule="released")`` against a clean-room loop of the released training semantics.

Guards against ``fit`` drifting from the released FMA training loop: its learning-rate
schedule (full rate at step 1, warm-up over the first epoch, then a cosine annealer chained
from the last warm-up rate), its sampling (a fresh shuffle every epoch, batches of 32 with the
last smaller batch kept, t ~ U(0, 1) per row), its Brownian-bridge noise and target, and its
loss (per-row sum over dims of the squared velocity error, averaged over rows). A drift in any
of these can still leave a model that trains and scores plausibly, so unit tests of the parts
do not catch it; comparing what the two trainers reach does.

The clean-room loop below is written from the description of the released code only: it uses
:class:`fma_fast.VelocityNet` as the network and fma_fast's solver to score, and none of
fma_fast's training code. The two trainers draw their random numbers differently, so on the
same task and seed they differ by seed noise only; the test checks, for every Euler step count
M = 0..10, that the mean paired difference of test accuracy (fit - clean room) over
(difficulty, seed) pairs lies within a bound taken from the spread of those differences. So
that the comparison cannot pass vacuously (two trainers that learn nothing agree), both must
also beat zero-shot (M = 0) on the hard task at the M chosen on the validation split.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import fma_fast
from fma_fast.experiments.synthetic import make_task

DIFFICULTIES = (0.3, 0.6, 0.9)  # easy: mostly own-class direction; hard: entangled, 4 modes
HARD = 0.9
SEEDS = (1, 2, 3, 4)
CLASSES, DIM, SHOTS, TEST_PER_CLASS = 10, 32, 4, 30
BLOCKS, EPOCHS, LR, GAMMA = 1, 100, 1e-3, 0.05
BATCH, WEIGHT_DECAY, WARMUP_EPOCHS, TIME_EPS = 32, 0.01, 1, 1e-3
MAX_STEPS = 10
SE_MULTIPLE = 3.0


def clean_room_fit(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, *, seed: int
) -> tuple[fma_fast.VelocityNet, list[float]]:
    """The released training loop, from its description: returns the model and the rate of
    every optimizer step."""
    torch.manual_seed(seed)
    model = fma_fast.VelocityNet(x.shape[1], blocks=BLOCKS).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(x.shape[0] / BATCH)
    total_steps = EPOCHS * steps_per_epoch
    warmup_steps = WARMUP_EPOCHS * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total_steps - warmup_steps, eta_min=0
    )
    generator = torch.Generator().manual_seed(seed)
    rates: list[float] = []
    cur_step = 0
    for _ in range(EPOCHS):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], BATCH):
            index = order[start : start + BATCH]
            x0, z_y = x[index], z[y[index]]
            t = torch.rand(len(index), 1, generator=generator).clamp(TIME_EPS, 1 - TIME_EPS)
            eps = torch.randn(x0.shape, generator=generator)
            root = torch.sqrt(t * (1 - t))
            x_t = (1 - t) * x0 + t * z_y + GAMMA * root * eps
            target = z_y - x0 + GAMMA * 0.5 * (1 - 2 * t) / root * eps
            loss = ((model(x_t, t) - target) ** 2).sum(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            cur_step += 1
            if cur_step < warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = LR * cur_step / warmup_steps
            else:
                scheduler.step()
    return model.eval(), rates


def _score(model, task) -> tuple[list[float], float]:
    """Test accuracy per M, and the test accuracy at the M chosen on val."""
    test = fma_fast.accuracy_by_steps(
        model, task.test.features, task.test.labels, task.class_features,
        max_steps=MAX_STEPS, backend="reference",
    )
    chosen = fma_fast.select_steps(
        model, task.val.features, task.val.labels, task.class_features,
        max_steps=MAX_STEPS, backend="reference",
    ).best_steps
    return test, test[chosen]


@pytest.fixture(scope="module")
def runs(one_thread):
    """Per (difficulty, seed): both trainers' test accuracy per M, at the chosen M, and rates."""
    results = {}
    for difficulty in DIFFICULTIES:
        for seed in SEEDS:
            task = make_task(
                num_classes=CLASSES, dim=DIM, shots=SHOTS, test_per_class=TEST_PER_CLASS,
                difficulty=difficulty, seed=seed,
            )
            x, y, z = task.train.features, task.train.labels, task.class_features
            fitted = fma_fast.fit(
                x, y, z, blocks=BLOCKS, epochs=EPOCHS, batch_size=BATCH, lr=LR,
                weight_decay=WEIGHT_DECAY, warmup_epochs=WARMUP_EPOCHS, schedule="released",
                gamma=GAMMA, noise="bridge", seed=seed, time_eps=TIME_EPS,
                backend="reference", progress=False,
            )
            clean_model, clean_rates = clean_room_fit(x, y, z, seed=seed)
            results[difficulty, seed] = {
                "fit": _score(fitted.model, task),
                "clean": _score(clean_model, task),
                "fit_rates": fitted.learning_rates,
                "clean_rates": clean_rates,
            }
    return results


def test_fit_rates_match_the_released_schedule(runs):
    for key, run in runs.items():
        assert run["fit_rates"] == pytest.approx(run["clean_rates"], rel=1e-9, abs=0), key


def test_fit_matches_clean_room_accuracy_per_steps(runs):
    floor = 1.0 / (CLASSES * TEST_PER_CLASS)  # one test row's worth of accuracy
    failures = []
    for m in range(MAX_STEPS + 1):
        diffs = [run["fit"][0][m] - run["clean"][0][m] for run in runs.values()]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        bound = SE_MULTIPLE * se + floor
        if abs(mean) > bound:
            failures.append(f"M={m}: mean paired diff {mean:+.4f}, bound {bound:.4f}")
    assert not failures, "fit drifts from the released loop: " + "; ".join(failures)


def test_both_trainers_beat_zero_shot_on_the_hard_task(runs):
    for seed in SEEDS:
        run = runs[HARD, seed]
        for trainer in ("fit", "clean"):
            test, at_chosen = run[trainer]
            assert at_chosen > test[0], (trainer, seed, at_chosen, test[0])
