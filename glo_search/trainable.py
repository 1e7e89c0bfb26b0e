"""Ray Tune function trainable around the GLO trainer.

Every evaluated epoch it reports every metric of :data:`glo_search.metrics.METRICS`, so
that ASHA, the searcher and CheckpointConfig (which keeps the best checkpoint by the
sweep's metric) all see the same numbers. Epochs are evaluated every ``eval_every`` epochs
(see glo_search.search.default_eval_every), at the scheduler's rungs and at the last
epoch; other epochs train without a report.

A report carries a checkpoint when its epoch is the trial's best so far by the sweep's
metric, when it is the last epoch, or when the latest checkpoint is CHECKPOINT_EVERY or
more epochs old. Tune keeps the best checkpoint among those it received, so the best
evaluated epoch's checkpoint is kept as with a checkpoint at every evaluated epoch. Each
checkpoint costs a copy into storage, a copy of the TensorBoard files and a snapshot of
Tune's state in the driver.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from glo_search import probes

# config_keys comes from glo_search.config, not glo_search.spaces, so that a Ray worker
# does not import Optuna.
from glo_search.config import TrainConfig, config_keys, from_dict
from glo_search.data import Dataset, load_dataset
from glo_search.metrics import METRICS
from glo_search.tensorboard import TrainingLog, encode_image
from glo_search.trainer import (
    CHECKPOINT_FILE,
    Trainer,
    evaluation_due,
    read_checkpoint,
    swap_setup,
)

logger = logging.getLogger(__name__)

# Epochs after which an evaluated epoch gets a checkpoint even when it is not the trial's
# best so far. Best epochs and the last epoch always get one. The bound limits the epochs
# that a trial repeats when a crash or a resume restarts it from its latest checkpoint,
# as far as evaluated epochs allow: with metrics only at ASHA's rungs, a whole gap.
CHECKPOINT_EVERY = 5

# Seconds a trial spends in each part, summed over its epochs and reported with every
# result, so that a sweep's wall time splits into training, metrics and the rest.
# setup_time_s: data, trainer, restore and TensorBoard log. train_time_s: train_epoch.
# eval_time_s: evaluate. log_time_s: TensorBoard writes. checkpoint_time_s: torch.save.
# report_time_s: tune.report, which copies a checkpoint and the TensorBoard files into
# storage and then waits for Tune's next request. A result carries its own times, except
# report_time_s, which covers the earlier results only.
TIMERS = (
    "setup_time_s",
    "train_time_s",
    "eval_time_s",
    "log_time_s",
    "checkpoint_time_s",
    "report_time_s",
)


def worst_result(epoch: int, train_loss: float) -> dict[str, Any]:
    """Result of a diverged trial: every metric at its worst, finite value."""
    result: dict[str, Any] = {name: spec.worst for name, spec in METRICS.items()}
    result.update({f"nearest_{k}": -1 for k in range(10)})
    loss = train_loss if math.isfinite(train_loss) else -1.0
    return {**result, "epoch": epoch, "train_loss": loss, "diverged": 1}


def diverged_metric(metrics: dict[str, float]) -> str | None:
    for name in METRICS:
        if not math.isfinite(metrics[name]):
            return name
    return None


def train_glo(
    config: dict[str, Any],
    base: dict[str, Any],
    classifier_state: dict[str, torch.Tensor] | None = None,
    metric: str = "disentanglement",
    eval_epochs: tuple[int, ...] = (),
) -> None:
    """Train one trial: ``base`` (the sweep's fixed settings) updated by Tune's ``config``.

    ``metric`` is the sweep's metric; TensorBoard's ``best/`` images follow it. Epochs in
    ``eval_epochs`` (the scheduler's rungs) are evaluated and reported whatever
    ``eval_every`` is; other epochs without an evaluation report nothing to Tune.
    """
    started = time.perf_counter()
    train_config = from_dict({**base, **config_keys(config)})
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint
    context = tune.get_context()
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    trainer = Trainer(train_config, _dataset(train_config), classifier_state)
    _restore(trainer)
    log = TrainingLog(_log_dir(), train_config, metric)
    seconds = dict.fromkeys(TIMERS, 0.0)
    seconds["setup_time_s"] = time.perf_counter() - started
    try:
        _train_loop(trainer, log, eval_epochs, seconds)
    finally:
        log.close()


# Datasets loaded in this process, by the fields that choose the digits. A reused Ray
# worker runs many trials on the same digits, and reading and decoding them took
# 0.03-0.15 s per trial on a 2-core AMD EPYC VM.
_DATASETS: dict[tuple, Dataset] = {}
_DATA_FIELDS = ("dataset", "data_root", "split", "num_images", "download")


def _dataset(config: TrainConfig) -> Dataset:
    key = tuple(getattr(config, name) for name in _DATA_FIELDS)
    if key not in _DATASETS:
        _DATASETS.clear()  # sweeps train on one dataset; keep only the latest
        _DATASETS[key] = load_dataset(config)
    return _DATASETS[key]


def prepare_worker(config: TrainConfig | None = None) -> None:
    """Prepare this process as the first trial on ``config``'s digits (default:
    TrainConfig's) would: load the digits, compute their swaps, select TensorBoard's probe
    rows (all three kept in caches) and load the PNG encoder.

    The probe rows and the encoder cost a worker's first trial 0.03-0.06 s at its first
    TensorBoard images (2-core Intel Xeon VM).
    """
    config = config or TrainConfig()
    dataset = _dataset(config)
    swap_setup(dataset, config.swap_sources, config.seed)
    probes.dataset_probes(dataset, config.seed)
    encode_image(torch.zeros(1, 1, 1))  # PIL loads its PNG encoder at the first image


def _log_dir() -> Path:
    """Return the folder for the trial's TensorBoard files.

    On local storage (a shared filesystem, on a cluster) that is the trial's folder in
    the experiment folder, so the files are complete there once the log closes. Tune
    ends a stopped trial's thread while it copies the trial's files, and such copies
    lacked the log's end for 5 of the 14 trials that ASHA stopped in one sweep. On other
    storage it is the trial's working folder, which the sweep's
    SyncConfig(sync_artifacts=True) makes Tune copy into the trial folder at every
    checkpoint and when the trial ends, from whichever node runs the trial.
    NOTE: tune.get_context().get_trial_dir() is neither folder in Ray 2.60. For the first
    trial of a worker it is the driver's staging folder, which a worker on another node
    cannot reach. For later trials of a reused worker it is the working folder.
    """
    from ray.train._internal.session import get_session

    storage = get_session().storage
    if isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
        return Path(storage.trial_fs_path) / "tensorboard"
    return Path(storage.trial_working_directory) / "tensorboard"


def _restore(trainer: Trainer) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        trainer.load_state_dict(read_checkpoint(folder))
    logger.info("trial resumed from its checkpoint after epoch %d", trainer.epoch)


def _train_loop(
    trainer: Trainer,
    log: TrainingLog,
    eval_epochs: tuple[int, ...] = (),
    seconds: dict[str, float] | None = None,
) -> None:
    # The node that ran each epoch; a trial retried after a crash may move to another node.
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    seconds = seconds if seconds is not None else dict.fromkeys(TIMERS, 0.0)
    checkpointed = trainer.epoch  # the epoch of the latest checkpoint
    while trainer.epoch < trainer.config.epochs:
        started = time.perf_counter()
        train_loss = trainer.train_epoch()
        seconds["train_time_s"] += time.perf_counter() - started
        if not math.isfinite(train_loss):
            logger.warning(
                "training loss is %s at epoch %d: trial diverged",
                train_loss,
                trainer.epoch,
            )
            _report_divergence(log, {**worst_result(trainer.epoch, train_loss), **node})
            return
        if not evaluation_due(trainer.epoch, trainer.config, eval_epochs):
            continue
        started = time.perf_counter()
        metrics = trainer.evaluate()
        seconds["eval_time_s"] += time.perf_counter() - started
        bad = diverged_metric(metrics)
        if bad is not None:
            logger.warning(
                "%s is %s at epoch %d: trial diverged", bad, metrics[bad], trainer.epoch
            )
            _report_divergence(log, {**worst_result(trainer.epoch, train_loss), **node})
            return
        result = {
            **metrics,
            "epoch": trainer.epoch,
            "train_loss": train_loss,
            "diverged": 0,
            **node,
            **seconds,
        }
        started = time.perf_counter()
        new_best = log.write_epoch(trainer.epoch, result, trainer)
        if _is_last(trainer):
            # The scheduler may stop the trial at this report (LastEpochFIFOScheduler,
            # ASHA at max_t), and Tune then copies the trial's files while the trial's
            # thread finishes. Closed here, the log is complete in that copy.
            # NOTE: on storage other than local (see _log_dir), a trial that ASHA stops at
            # an earlier rung closes its log while Tune copies it, and the copy can lack
            # the log's end.
            log.close()
        seconds["log_time_s"] += time.perf_counter() - started
        if new_best or checkpointed + CHECKPOINT_EVERY <= trainer.epoch or _is_last(trainer):
            _report_with_checkpoint(trainer, result, metrics, seconds)
            checkpointed = trainer.epoch
        else:
            started = time.perf_counter()
            tune.report({**result, **seconds})
            seconds["report_time_s"] += time.perf_counter() - started


def _report_divergence(log: TrainingLog, result: dict[str, Any]) -> None:
    """Close the log, then report a diverged trial's worst values as its last result.

    The scheduler may stop the trial at this report, and Tune then copies the trial's
    files while the trial's thread finishes, so the log is closed first.
    """
    log.close()
    tune.report(result)


def _is_last(trainer: Trainer) -> bool:
    return trainer.epoch >= trainer.config.epochs


def _report_with_checkpoint(
    trainer: Trainer, result: dict[str, Any], metrics: dict[str, Any], seconds: dict
) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        trainer.save(Path(folder) / CHECKPOINT_FILE, extra={"metrics": metrics})
        saved = time.perf_counter()
        seconds["checkpoint_time_s"] += saved - started
        tune.report({**result, **seconds}, checkpoint=tune.Checkpoint.from_directory(folder))
    seconds["report_time_s"] += time.perf_counter() - saved
