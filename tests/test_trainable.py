"""Checkpoints and part timers of the trainable's reports, with Tune's report replaced."""

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from glo_search import probes, trainable
from glo_search.config import TrainConfig
from glo_search.trainer import Trainer


class ScriptedLog:
    """TrainingLog stand-in whose write_epoch returns a scripted new-best flag per epoch."""

    latest = None  # the log of the last trainer started, which the reports look at

    def __init__(self, best_epochs: set[int]) -> None:
        self.best_epochs = best_epochs
        self.closed = False
        ScriptedLog.latest = self

    def write_epoch(self, epoch, result, trainer=None) -> bool:
        return epoch in self.best_epochs

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def closed_at_report():
    """Whether the log was closed at each tune.report, in the order of the reports."""
    return []


@pytest.fixture
def reports(monkeypatch, closed_at_report):
    """Record (epoch, has_checkpoint, result) for every tune.report of the trainable."""
    recorded = []

    def report(result, checkpoint=None):
        recorded.append((result["epoch"], checkpoint is not None, result))
        closed_at_report.append(ScriptedLog.latest.closed)

    context = SimpleNamespace(get_node_id=lambda: "node")
    monkeypatch.setattr(trainable.tune, "report", report)
    monkeypatch.setattr(trainable.ray, "get_runtime_context", lambda: context)
    return recorded


@pytest.fixture
def train(small_dataset, classifier_state, reports):
    def run(epochs: int, best_epochs: set[int], nan_at_epoch: int = 0, **config) -> None:
        train_config = TrainConfig(num_images=200, swap_sources=20, epochs=epochs, **config)
        trainer = Trainer(train_config, small_dataset, classifier_state, "cpu")
        if nan_at_epoch:
            train_epoch = trainer.train_epoch

            def diverging_epoch() -> float:
                loss = train_epoch()
                return float("nan") if trainer.epoch == nan_at_epoch else loss

            trainer.train_epoch = diverging_epoch
        trainable._train_loop(trainer, ScriptedLog(best_epochs), ())

    return run


def test_checkpoints_at_best_gap_and_last(train, reports):
    # Checkpoints: the best epochs 1, 2 and 4, epoch 9 (5 after 4) and the last epoch 12.
    train(epochs=12, best_epochs={1, 2, 4})
    assert [epoch for epoch, _, _ in reports] == list(range(1, 13))
    checkpointed = [epoch for epoch, has_checkpoint, _ in reports if has_checkpoint]
    assert checkpointed == [1, 2, 4, 9, 12]


def test_checkpoint_every_evaluated_best(train, reports):
    train(epochs=6, best_epochs=set(range(1, 7)), eval_every=2)
    assert [epoch for epoch, has_checkpoint, _ in reports if has_checkpoint] == [2, 4, 6]


def test_log_closed_before_last_report(train, reports, closed_at_report):
    # The scheduler may stop the trial at its last report, and Tune then copies the
    # trial's files at once: the log must be complete by then.
    train(epochs=3, best_epochs={1})
    assert closed_at_report == [False, False, True]


def test_diverged_trial_closes_log_first(train, reports, closed_at_report):
    train(epochs=5, best_epochs={1}, nan_at_epoch=2)
    assert [epoch for epoch, _, _ in reports] == [1, 2]
    assert reports[-1][2]["diverged"] == 1
    assert closed_at_report == [False, True]


def test_reports_carry_part_timers(train, reports):
    train(epochs=3, best_epochs={1})
    for _, _, result in reports:
        for name in trainable.TIMERS:
            assert result[name] >= 0.0, name
    assert reports[-1][2]["train_time_s"] > reports[0][2]["train_time_s"]
    assert reports[-1][2]["log_time_s"] >= reports[0][2]["log_time_s"]


@pytest.mark.parametrize(
    ("filesystem", "expected"),
    [
        (pafs.LocalFileSystem(), "/runs/exp/trial_a/tensorboard"),
        (pafs.SubTreeFileSystem("/bucket", pafs.LocalFileSystem()), "/work/trial_a/tensorboard"),
    ],
)
def test_log_dir_by_storage(monkeypatch, filesystem, expected):
    # On local storage the log goes straight to its final place, so no copy of the trial's
    # files can miss its end. Elsewhere Tune copies the working folder.
    storage = SimpleNamespace(
        storage_filesystem=filesystem,
        trial_fs_path="/runs/exp/trial_a",
        trial_working_directory="/work/trial_a",
    )
    monkeypatch.setattr(
        "ray.train._internal.session.get_session", lambda: SimpleNamespace(storage=storage)
    )
    assert trainable._log_dir() == Path(expected)


def test_prepared_worker_reuses_digits(monkeypatch):
    """A Ray worker's preload (glo_search.worker) leaves what a default trial loads first."""
    from glo_search import trainer as trainer_module

    trainable._DATASETS.clear()
    trainable.prepare_worker()
    assert len(trainable._DATASETS) == 1
    (prepared,) = trainable._DATASETS.values()

    def no_new_swaps(*args, **kwargs):
        raise AssertionError("the swaps were computed again")

    def no_new_probes(*args, **kwargs):
        raise AssertionError("the probe rows were selected again")

    # A default trial after the preparation reads the caches and computes nothing.
    monkeypatch.setattr(trainer_module.m, "build_swaps", no_new_swaps)
    monkeypatch.setattr(probes, "select_probes", no_new_probes)
    assert len(probes.dataset_probes(prepared, TrainConfig().seed)) > 0
    config = TrainConfig()
    dataset = trainable._dataset(config)
    assert dataset is prepared
    assert len(dataset) == config.num_images
    swaps = trainer_module.swap_setup(dataset, config.swap_sources, config.seed)
    trainer = Trainer(config, dataset, device="cpu")
    assert trainer.swaps is swaps[0]
    assert trainer.source_attributes is swaps[1]
