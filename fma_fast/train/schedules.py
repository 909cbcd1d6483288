"""``fit``'s learning-rate schedules (docs/method.md §8): the rate of every optimizer step."""

from __future__ import annotations

import math

from ..core.names import SCHEDULES, Schedule, check_choice


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """"warmup-cosine": linear warm-up over ``warmup_steps`` (step k at (k+1)/W), then cosine
    decay to 0 at ``total_steps``; ``step`` counts from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay_steps)))


def _released_rates(lr: float, warmup_steps: int, total_steps: int) -> list[float]:
    """The released loop's rate at every step: the first step at the full ``lr``; after step k
    (counting from 1) a warm-up sets lr·k/W while k < W; from then on a cosine annealer over
    T = total − W steps scales the current rate by (1 + cos(πj/T)) / (1 + cos(π(j−1)/T)) at
    its j-th step, so the cosine starts from the last warm-up rate, not from ``lr``. The
    products are taken in the annealer's order, so the rates match it to the last bit."""
    cosine_steps = total_steps - warmup_steps
    rates, current, annealed = [lr], lr, 0
    for done in range(1, total_steps):
        if done < warmup_steps:
            current = lr * (float(done) / float(warmup_steps))
        else:
            annealed += 1
            current = (
                (1 + math.cos(math.pi * annealed / cosine_steps))
                / (1 + math.cos(math.pi * (annealed - 1) / cosine_steps))
                * current
            )
        rates.append(current)
    return rates


def learning_rates(schedule: Schedule, lr: float, warmup_steps: int, total_steps: int
                   ) -> list[float]:
    """The learning rate of each of ``total_steps`` optimizer steps under ``schedule``."""
    if check_choice("schedule", schedule, SCHEDULES) == "released":
        return _released_rates(lr, warmup_steps, total_steps)
    return [lr * lr_factor(step, warmup_steps, total_steps) for step in range(total_steps)]
