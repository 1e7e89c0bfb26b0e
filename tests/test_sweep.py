"""Real sweeps through Ray Tune, OptunaSearch and ASHA on a few hundred digits."""

import json
import logging
import sqlite3
from contextlib import closing

import optuna
import pandas as pd
import pytest
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from glo_search.config import ConfigError
from glo_search.metrics import METRICS
from glo_search.search import _check_name, configure_tune_environment, make_scheduler, sweep

SMALL = {"num_images": 300, "swap_sources": 60, "eval_every": 1}


@pytest.fixture(scope="module")
def small_sweep(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweeps")
    grid = sweep(
        "default",
        num_samples=3,
        max_epochs=2,
        base_config=SMALL,
        storage=storage,
        name="small",
        grace_period=1,
        reduction_factor=2,
        verbose=0,
    )
    return grid, storage / "small"


def test_sweep_runs_every_trial(small_sweep):
    grid, _ = small_sweep
    assert len(grid) == 3
    assert not grid.errors


def test_sweep_trials_parquet(small_sweep):
    _, folder = small_sweep
    trials = pd.read_parquet(folder / "trials.parquet")
    assert len(trials) == 3
    assert trials["trial_id"].is_unique
    for column in ("class_dim", "content_dim", "noise_std", "content_decay", "loss", "num_images"):
        assert column in trials.columns
    assert (trials["num_images"] == 300).all()
    assert set(trials["status"]) <= {"completed", "stopped"}
    for name in METRICS:
        assert trials[f"best_{name}"].between(0, 1).all(), name
        assert trials[f"last_{name}"].between(0, 1).all(), name
    assert trials["best_epoch"].between(1, 2).all()
    for path in trials["checkpoint_path"]:
        assert (folder / path / "trainer.pt").is_file()


def test_sweep_epochs_parquet_matches_trials(small_sweep):
    _, folder = small_sweep
    trials = pd.read_parquet(folder / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert set(epochs["trial_id"]) == set(trials.index)
    for trial_id, rows in epochs.groupby("trial_id"):
        assert rows["epoch"].tolist() == list(range(1, len(rows) + 1))
        assert trials.loc[trial_id, "epochs_run"] == len(rows)
        assert trials.loc[trial_id, "epochs"] == 2
        assert trials.loc[trial_id, "best_disentanglement"] == rows["disentanglement"].max()
        assert trials.loc[trial_id, "last_recon_error"] == rows["recon_error"].iloc[-1]
        best_row = rows[rows["epoch"] == trials.loc[trial_id, "best_epoch"]].iloc[0]
        for name in METRICS:
            assert trials.loc[trial_id, f"at_best_{name}"] == best_row[name], name
    nearest = epochs[[f"nearest_{k}" for k in range(10)]]
    assert nearest.isin(range(10)).all().all()


def test_sweep_optuna_study_in_sqlite(small_sweep):
    _, folder = small_sweep
    study = optuna.load_study(study_name="small", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.trials) == 3
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert {"class_dim", "content_dim", "noise_std"} <= set(study.trials[0].params)


def test_sweep_leaves_study_as_one_file(small_sweep):
    """optuna.db alone contains every record, in SQLite's default journal mode, so a copy
    of that file, or of the folder on read-only media, opens with the whole study."""
    _, folder = small_sweep
    assert not (folder / "optuna.db-wal").exists()
    assert not (folder / "optuna.db-shm").exists()
    with closing(sqlite3.connect(folder / "optuna.db")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert connection.execute("SELECT COUNT(*) FROM trials").fetchone() == (3,)


def test_sweep_records_experiment(small_sweep):
    _, folder = small_sweep
    experiment = json.loads((folder / "experiment.json").read_text())
    assert experiment["metric"] == "disentanglement"
    assert experiment["mode"] == "max"
    assert experiment["base_config"]["num_images"] == 300
    assert experiment["classifier"]["held_out_accuracy"] >= 0.97


def test_sweep_tensorboard_per_trial(small_sweep):
    """Each trial folder contains that trial's own TensorBoard scalars, also for trials
    that ran in a reused Ray worker (three trials on two slots reuse at least one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, folder = small_sweep
    trials = pd.read_parquet(folder / "trials.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    processes = []
    for trial_id, trial_dir in zip(trials["trial_id"], trials["trial_dir"], strict=True):
        logs = folder / trial_dir / "tensorboard"
        files = list(logs.glob("events.out.tfevents.*"))
        assert files, trial_dir
        # The file name ends in <pid>.<count>: the Ray worker process that wrote it.
        processes += [file.name.split(".")[-2] for file in files]
        events = EventAccumulator(str(logs))
        events.Reload()
        steps = [event.step for event in events.Scalars("metrics/disentanglement")]
        assert steps == epochs.loc[epochs["trial_id"] == trial_id, "epoch"].tolist()
    assert len(set(processes)) < len(processes), "no trial ran in a reused worker"


def test_fifo_stops_at_last_epoch():
    # Tune then ends the trial on that result instead of requesting another from the worker.
    scheduler = make_scheduler("fifo", 5)
    assert scheduler.on_trial_result(None, None, {"epoch": 4}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, None, {"epoch": 5}) == TrialScheduler.STOP


class StopAfterFirstEpoch(FIFOScheduler):
    """Let the first trial run to the end; stop every later trial after epoch 1."""

    def __init__(self):
        super().__init__()
        self.first = None
        self.stopped = set()

    def on_trial_result(self, tune_controller, trial, result):
        self.first = self.first or trial.trial_id
        if trial.trial_id != self.first and result["epoch"] >= 1:
            self.stopped.add(trial.trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def test_custom_scheduler_decisions_take_effect(ray_session, tmp_path):
    scheduler = StopAfterFirstEpoch()
    sweep(
        {"class_dim": tune.choice([3, 5])},
        search_alg=_random_searcher(),
        scheduler=scheduler,
        num_samples=3,
        max_epochs=3,
        base_config=SMALL,
        storage=tmp_path,
        name="custom",
        max_concurrent=1,
        verbose=0,
    )
    trials = pd.read_parquet(tmp_path / "custom" / "trials.parquet").set_index("trial_id")
    assert len(scheduler.stopped) == 2
    for trial_id, row in trials.iterrows():
        if trial_id in scheduler.stopped:
            assert row["epochs_run"] == 1
            assert row["status"] == "stopped"
        else:
            assert row["epochs_run"] == 3
            assert row["status"] == "completed"


def _random_searcher():
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metric": "accuracy"}, "unknown metric 'accuracy'"),
        ({"base_config": {"class_dim": 0}}, "invalid class_dim=0"),
        ({"space": "nope"}, "unknown search space 'nope'"),
        ({"space": "report", "base_config": {"noise_std": 0.3}}, "noise_std is set both"),
        ({"cpus_per_trial": 0}, "cpus_per_trial=0"),
        ({"num_samples": 0}, "num_samples=0"),
    ],
)
def test_sweep_rejects_bad_input_before_ray(tmp_path, arguments, message):
    import ray

    started = ray.is_initialized()
    with pytest.raises(ConfigError, match=message):
        sweep(**{"storage": tmp_path, "name": "bad", **arguments})
    assert ray.is_initialized() == started
    assert not (tmp_path / "bad").exists()


def test_sweep_refuses_existing_experiment(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "trials.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="glo-search resume"):
        sweep("default", storage=tmp_path, name="taken")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_epochs": 0}, "invalid max_epochs=0"),
        ({"grace_period": 5}, "invalid grace_period=5 .*between 1 and max_epochs=4"),
        ({"grace_period": 0}, "invalid grace_period=0"),
        ({"reduction_factor": 1}, "invalid reduction_factor=1"),
    ],
)
def test_make_scheduler_rejects_bad_schedule(arguments, message):
    with pytest.raises(ConfigError, match=message):
        make_scheduler("asha", **{"max_epochs": 4, **arguments})


def _rungs(scheduler) -> list[int]:
    return sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)


def test_make_scheduler_rungs_in_epochs():
    assert _rungs(make_scheduler("asha", max_epochs=20)) == [2, 6, 18]
    assert _rungs(make_scheduler("asha", max_epochs=20, grace_period=1, reduction_factor=2)) == [
        1,
        2,
        4,
        8,
        16,
    ]


def test_make_scheduler_default_grace_fits_short_sweeps():
    assert _rungs(make_scheduler("asha", max_epochs=1)) == [1]


def test_sweep_evaluates_at_rungs_and_every_k(ray_session, tmp_path):
    # eval_every 3 over 5 epochs, ASHA rungs at epochs 1 and 4: metrics at 1, 3, 4 and 5.
    # ASHA never stops the first trial to reach a rung, so one trial runs all 5 epochs.
    sweep(
        "default",
        num_samples=1,
        max_epochs=5,
        base_config={**SMALL, "eval_every": 3},
        storage=tmp_path,
        name="every3",
        grace_period=1,
        reduction_factor=4,
        max_concurrent=1,
        verbose=0,
    )
    experiment = json.loads((tmp_path / "every3" / "experiment.json").read_text())
    assert experiment["rungs"] == [1, 4]
    epochs = pd.read_parquet(tmp_path / "every3" / "epochs.parquet")
    assert epochs["epoch"].tolist() == [1, 3, 4, 5]


def test_sweep_with_define_by_run_space_file(ray_session, tmp_path):
    space_file = tmp_path / "my_space.py"
    space_file.write_text(
        "def SPACE(trial):\n"
        "    trial.suggest_int('class_dim', 2, 8, log=True)\n"
        "    return {'content_decay': 0.0}\n"
    )
    grid = sweep(
        str(space_file),
        num_samples=2,
        max_epochs=1,
        base_config={"num_images": 100, "swap_sources": 20, "eval_every": 1},
        storage=tmp_path / "runs",
        name="file",
        verbose=0,
    )
    assert not grid.errors
    trials = pd.read_parquet(tmp_path / "runs" / "file" / "trials.parquet")
    assert len(trials) == 2
    assert trials["class_dim"].between(2, 8).all()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a\nb", "control character"),
        ("tab\there", "control character"),
        (" lead", "starts or ends with a space"),
        ("é" * 128, "longer than 255 bytes"),
    ],
)
def test_sweep_rejects_bad_names(name, problem, tmp_path):
    with pytest.raises(ConfigError, match=problem):
        sweep("default", num_samples=1, max_epochs=1, storage=tmp_path, name=name)
    assert not list(tmp_path.iterdir())  # nothing created


def test_sweep_name_of_255_bytes_is_valid():
    _check_name("é" * 127 + "n")


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        ("Experiment has been interrupted, but the most recent state was saved.", False),
        ("Failed to fetch metrics for 1 trial(s):\n- t1: FileNotFoundError('no results')", False),
        (
            "Failed to fetch metrics for 2 trial(s):\n- t1: FileNotFoundError('no results')\n"
            "- t2: JSONDecodeError('damaged')",
            True,
        ),
        ("Trial t1 completed after 2 iterations", True),
    ],
)
def test_misleading_tune_lines_dropped(message, kept):
    configure_tune_environment()
    tune_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    record = tune_logger.makeRecord(
        tune_logger.name, logging.WARNING, __file__, 1, message, (), None
    )
    assert tune_logger.filter(record) == kept
