"""The grid of the hand-tuned study of this model, searched as categorical choices."""

from __future__ import annotations

from optuna.distributions import CategoricalDistribution

DESCRIPTION = (
    "the hand-tuned study's grid: class_dim 5 10 15 25 50; content_dim 10 25 50 75 100; "
    "noise_std 0.0001 0.3 5 10 100; content_decay 0 0.1 0.5 1"
)

SPACE = {
    "class_dim": CategoricalDistribution([5, 10, 15, 25, 50]),
    "content_dim": CategoricalDistribution([10, 25, 50, 75, 100]),
    "noise_std": CategoricalDistribution([0.0001, 0.3, 5.0, 10.0, 100.0]),
    "content_decay": CategoricalDistribution([0.0, 0.1, 0.5, 1.0]),
}
