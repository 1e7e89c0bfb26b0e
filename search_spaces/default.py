"""Continuous space around the reference setting, log scales, lambda = 0 as its own branch."""

from __future__ import annotations

DESCRIPTION = (
    "continuous: class_dim 2-64, content_dim 4-128, noise_std 1e-3-10 (log scales); "
    "content_decay 0 or 1e-3-1 (log)"
)


def SPACE(trial):  # noqa: N802 - the name every space module exports
    trial.suggest_int("class_dim", 2, 64, log=True)
    trial.suggest_int("content_dim", 4, 128, log=True)
    trial.suggest_float("noise_std", 1e-3, 10.0, log=True)
    # lambda = 0 is a qualitatively different model (no shrinkage), so it gets its own
    # branch instead of being a point that a log scale cannot reach.
    if trial.suggest_categorical("_content_decay_on", [False, True]):
        trial.suggest_float("content_decay", 1e-3, 1.0, log=True)
        return None
    return {"content_decay": 0.0}
