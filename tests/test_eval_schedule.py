"""Metrics every eval_every epochs, at the last epoch and at the scheduler's rungs."""

import pandas as pd
import pytest

from glo_search.config import TrainConfig
from glo_search.single import train_run
from glo_search.trainer import evaluation_due


@pytest.mark.parametrize(
    ("eval_every", "milestones", "expected"),
    [
        (1, (), [1, 2, 3, 4, 5, 6, 7]),
        (3, (), [3, 6, 7]),
        (3, (1, 4), [1, 3, 4, 6, 7]),
        (10, (2,), [2, 7]),
    ],
)
def test_evaluation_due_epochs(eval_every, milestones, expected):
    config = TrainConfig(epochs=7, eval_every=eval_every)
    due = [epoch for epoch in range(1, 8) if evaluation_due(epoch, config, milestones)]
    assert due == expected


def test_train_run_evaluates_every_k_epochs(tmp_path):
    config = TrainConfig(num_images=100, swap_sources=20, epochs=3, eval_every=2)
    history = train_run(config, tmp_path)
    assert [row["epoch"] for row in history] == [2, 3]
    epochs = pd.read_parquet(tmp_path / "epochs.parquet")
    assert epochs["epoch"].tolist() == [2, 3]


def test_sweep_evaluates_rungs_and_last_epoch_by_default(ray_session, tmp_path):
    from optuna.distributions import CategoricalDistribution

    from glo_search.results import read_experiment
    from glo_search.search import sweep

    sweep(
        {"class_dim": CategoricalDistribution([5])},
        num_samples=1,
        max_epochs=4,
        base_config={"num_images": 100, "swap_sources": 20},
        grace_period=1,
        reduction_factor=2,
        storage=tmp_path,
        name="default-schedule",
        verbose=0,
    )
    _, epochs = read_experiment(tmp_path / "default-schedule")
    # ASHA's rungs for 4 epochs, grace period 1 and reduction factor 2 are epochs 1 and 2.
    assert sorted(epochs["epoch"]) == [1, 2, 4]


def test_sweep_default_schedule_by_scheduler():
    from glo_search.search import default_eval_every, make_scheduler

    assert default_eval_every(make_scheduler("asha", 20, 2, 3), 20) == 20
    for name in ("fifo", "median", "hyperband"):
        assert default_eval_every(make_scheduler(name, 20, 2, 3), 20) == 1, name
