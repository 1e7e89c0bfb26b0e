"""Sweeps that meet faults: a diverging configuration, a crashing trial, ASHA stopping trials.

Each sweep runs on the session's Ray instance (2 CPUs) with 100 images and 20 swap
sources, so an epoch takes about a second.
"""

from __future__ import annotations

import math
import os
import signal
from collections import defaultdict

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from glo_search.results import read_experiment
from glo_search.search import sweep
from glo_search.searcher import STUDY_FILE, TUNE_TRIAL_ATTR
from glo_search.storage import sqlite_url

SMALL = {"num_images": 100, "swap_sources": 20, "batch_size": 50, "eval_every": 1}
MAX_EPOCHS = 4
ASHA_EPOCHS = 3
HUGE_LR = 1e10  # Adam steps of this size overflow float32 in the first epoch


class RecordingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped before max_t and every value it saw."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stopped_early: set[str] = set()
        self.values: list[float] = []

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self.values.append(result[self._metric])
        if action == TrialScheduler.STOP and result["epoch"] < self._max_t:
            self.stopped_early.add(trial.trial_id)
        return action

    def rung_values(self) -> list[float]:
        return [
            v for bracket in self._brackets for _, rung in bracket._rungs for v in rung.values()
        ]


def load_study(experiment_dir) -> dict[str, optuna.trial.FrozenTrial]:
    study = optuna.load_study(
        study_name=experiment_dir.name, storage=sqlite_url(experiment_dir / STUDY_FILE)
    )
    return {t.user_attrs[TUNE_TRIAL_ATTR]: t for t in study.trials}


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """Five trials under ASHA (rungs at epochs 1 and 2), the first with a huge learning rate."""
    scheduler = RecordingASHA(
        time_attr="epoch", max_t=ASHA_EPOCHS, grace_period=1, reduction_factor=2
    )
    storage = tmp_path_factory.mktemp("asha")
    sweep(
        {"lr_generator": CategoricalDistribution([1e-3, 3e-3, HUGE_LR])},
        num_samples=5,
        max_epochs=ASHA_EPOCHS,
        base_config=SMALL,
        scheduler=scheduler,
        sampler="random",
        storage=storage,
        name="asha",
        points=[{"lr_generator": HUGE_LR}, {"lr_generator": 3e-3}],
        verbose=0,
    )
    experiment_dir = storage / "asha"
    trials, epochs = read_experiment(experiment_dir)
    return scheduler, trials, epochs, load_study(experiment_dir)


def test_diverged_trial_recorded_with_worst(asha_sweep):
    _, trials, epochs, _ = asha_sweep
    diverged = trials[trials.lr_generator == HUGE_LR]
    assert len(diverged) >= 1
    assert set(diverged.status) == {"diverged"}
    assert set(diverged.best_disentanglement) == {0.0}
    rows = epochs[epochs.trial_id.isin(diverged.trial_id)]
    assert set(rows.diverged) == {1}
    assert set(rows.epoch) == {1}


def test_sweep_goes_on_after_divergence(asha_sweep):
    _, trials, _, _ = asha_sweep
    assert len(trials) == 5
    normal = trials[trials.lr_generator != HUGE_LR]
    assert len(normal) >= 1
    assert set(normal.status) <= {"completed", "stopped"}
    assert "completed" in set(normal.status)


def test_no_nan_reaches_asha(asha_sweep):
    scheduler, _, _, _ = asha_sweep
    assert scheduler.values
    assert all(math.isfinite(v) for v in scheduler.values)
    # The diverged trial reached the first rung with the worst value, not NaN.
    assert 0.0 in scheduler.rung_values()
    assert all(math.isfinite(v) for v in scheduler.rung_values())


def test_no_nan_reaches_optuna(asha_sweep):
    _, _, _, study = asha_sweep
    for trial in study.values():
        assert trial.value is None or math.isfinite(trial.value)
        assert all(math.isfinite(v) for v in trial.intermediate_values.values())


def test_study_states_match_asha(asha_sweep):
    scheduler, trials, _, study = asha_sweep
    assert scheduler.stopped_early, "ASHA stopped no trial early; the check would be empty"
    assert set(study) == set(trials.trial_id)
    for row in trials.itertuples():
        trial = study[row.trial_id]
        if row.status == "diverged":
            assert trial.state == TrialState.COMPLETE
            assert trial.value == 0.0
        elif row.trial_id in scheduler.stopped_early:
            assert trial.state == TrialState.PRUNED, row.trial_id
            assert max(trial.intermediate_values) == row.epochs
        else:
            assert trial.state == TrialState.COMPLETE, row.trial_id
            assert row.epochs == ASHA_EPOCHS
            assert trial.value == pytest.approx(row.last_disentanglement)


def test_warm_start_points_run_first(asha_sweep):
    _, _, _, study = asha_sweep
    first_two = sorted(study.values(), key=lambda t: t.number)[:2]
    assert [t.params["lr_generator"] for t in first_two] == [HUGE_LR, 3e-3]


class CrashOnce(tune.Callback):
    """Kill the worker process of the first trial that reports ``epoch``: a real crash."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.crashed: str | None = None
        self.epochs: dict[str, list[int]] = defaultdict(list)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epochs[trial.trial_id].append(result["epoch"])
        if self.crashed is None and result["epoch"] == self.epoch:
            self.crashed = trial.trial_id
            os.kill(result["pid"], signal.SIGKILL)


@pytest.mark.parametrize("max_failures", [1, 0])
def test_crashed_trial_retried_from_checkpoint(ray_session, tmp_path, max_failures):
    crash = CrashOnce(epoch=2)
    grid = sweep(
        {"class_dim": CategoricalDistribution([5])},
        num_samples=1,
        max_epochs=MAX_EPOCHS,
        base_config=SMALL,
        scheduler=FIFOScheduler(),
        storage=tmp_path,
        name="crash",
        max_failures=max_failures,
        callbacks=[crash],
        verbose=0,
    )
    trials, epochs = read_experiment(tmp_path / "crash")
    (trial_id,) = trials.trial_id
    assert crash.crashed == trial_id
    study = load_study(tmp_path / "crash")
    if max_failures == 0:
        assert len(grid.errors) == 1
        assert trials.status.tolist() == ["error"]
        assert study[trial_id].state == TrialState.FAIL
        return
    assert not grid.errors
    assert trials.status.tolist() == ["completed"]
    # The retry continued after the crash epoch's checkpoint instead of starting over.
    reported = crash.epochs[trial_id]
    assert reported[reported.index(2) + 1] > 1
    assert sorted(epochs.epoch) == list(range(1, MAX_EPOCHS + 1))
    assert study[trial_id].state == TrialState.COMPLETE
