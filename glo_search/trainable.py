"""Ray Tune function trainable around the GLO trainer.

Every evaluated epoch it reports every metric of :data:`glo_search.metrics.METRICS`
together with a checkpoint, so that ASHA, the searcher and CheckpointConfig (which keeps
the best checkpoint by the sweep's metric) all see the same numbers. Epochs are evaluated
every ``eval_every`` epochs (see glo_search.search.default_eval_every), at the
scheduler's rungs and at the last epoch; other epochs train without a report.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from glo_search.config import from_dict
from glo_search.data import load_dataset
from glo_search.metrics import METRICS
from glo_search.spaces import config_keys
from glo_search.tensorboard import TrainingLog
from glo_search.trainer import CHECKPOINT_FILE, Trainer, evaluation_due, read_checkpoint

logger = logging.getLogger(__name__)


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
    train_config = from_dict({**base, **config_keys(config)})
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint
    context = tune.get_context()
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    trainer = Trainer(train_config, load_dataset(train_config), classifier_state)
    _restore(trainer)
    log = TrainingLog(_artifact_dir() / "tensorboard", train_config, metric)
    try:
        _train_loop(trainer, log, eval_epochs)
    finally:
        log.close()


def _artifact_dir() -> Path:
    """Return the local folder whose files Tune copies into the trial folder of the storage.

    The sweep's SyncConfig(sync_artifacts=True) makes Tune copy this folder at every
    checkpoint and when the trial ends, from whichever node runs the trial.
    NOTE: tune.get_context().get_trial_dir() is not that folder in Ray 2.60. For the first
    trial of a worker it is the driver's staging folder, which a worker on another node
    cannot reach. For later trials of a reused worker it is the working folder.
    """
    from ray.train._internal.session import get_session

    return Path(get_session().storage.trial_working_directory)


def _restore(trainer: Trainer) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        trainer.load_state_dict(read_checkpoint(folder))
    logger.info("trial resumed from its checkpoint after epoch %d", trainer.epoch)


def _train_loop(trainer: Trainer, log: TrainingLog, eval_epochs: tuple[int, ...] = ()) -> None:
    # The node that ran each epoch; a trial retried after a crash may move to another node.
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    # Seconds this process spent in train_epoch and in evaluate, reported with each result
    # so that a sweep's time splits into training, metrics and the rest.
    seconds = {"train_time_s": 0.0, "eval_time_s": 0.0}
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
            tune.report({**worst_result(trainer.epoch, train_loss), **node})
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
            tune.report({**worst_result(trainer.epoch, train_loss), **node})
            return
        result = {
            **metrics,
            "epoch": trainer.epoch,
            "train_loss": train_loss,
            "diverged": 0,
            **node,
            **seconds,
        }
        log.write_epoch(trainer.epoch, result, trainer)
        with tempfile.TemporaryDirectory() as folder:
            trainer.save(Path(folder) / CHECKPOINT_FILE, extra={"metrics": metrics})
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
