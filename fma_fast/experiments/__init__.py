"""Layer 5, experiments: synthetic tasks, few-shot baselines, adaptive stopping and the
accuracy report. Nothing below this layer imports it."""
