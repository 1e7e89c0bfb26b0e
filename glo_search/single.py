"""One training run without Ray: the ``glo-search train`` command's engine."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from glo_search import classifier
from glo_search.config import TrainConfig
from glo_search.data import load_dataset
from glo_search.io import atomic_write_text
from glo_search.metrics import METRICS, metric_mode
from glo_search.results import write_table
from glo_search.tensorboard import TrainingLog
from glo_search.trainer import Trainer, evaluation_due

logger = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


def train_run(
    config: TrainConfig,
    out_dir: str | Path,
    metric: str = "disentanglement",
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Train one configuration, writing TensorBoard logs, checkpoints and epochs.parquet.

    ``best.pt`` is the checkpoint of the best epoch by ``metric``; ``last.pt`` is the
    latest evaluated one. Returns one result dict per evaluated epoch (every
    ``config.eval_every`` epochs and the last). A non-finite loss or metric stops the run
    early and is logged as divergence.
    """
    mode = metric_mode(metric)
    out_dir = Path(out_dir)
    # Data, classifier, feature network and device load before anything is written, so a
    # run that cannot start leaves no folder behind.
    trainer = Trainer(config, load_dataset(config), classifier.load_state(), device)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    logger.info("training on %s: %s", trainer.device, config)
    log = TrainingLog(out_dir / "tensorboard", config, metric)
    history: list[dict[str, Any]] = []
    best = None
    try:
        while trainer.epoch < config.epochs:
            result = _epoch(trainer)
            if result is None:
                break
            if not result:
                continue
            history.append(result)
            log.write_epoch(trainer.epoch, result, trainer)
            write_table(history, out_dir / "epochs.parquet")
            trainer.save(out_dir / LAST_CHECKPOINT, extra={"metrics": _metrics(result)})
            value = result[metric]
            if best is None or (value > best if mode == "max" else value < best):
                best = value
                trainer.save(out_dir / BEST_CHECKPOINT, extra={"metrics": _metrics(result)})
            logger.info("epoch %d/%d: %s", trainer.epoch, config.epochs, _format(result))
    finally:
        log.close()
    return history


def _epoch(trainer: Trainer) -> dict[str, Any] | None:
    """Train one epoch and evaluate when due; return None on divergence, {} when not due."""
    train_loss = trainer.train_epoch()
    if not math.isfinite(train_loss):
        logger.error("training loss is %s at epoch %d: run diverged", train_loss, trainer.epoch)
        return None
    if not evaluation_due(trainer.epoch, trainer.config):
        return {}
    metrics = trainer.evaluate()
    bad = [name for name in METRICS if not math.isfinite(metrics[name])]
    if bad:
        logger.error("%s is not finite at epoch %d: run diverged", bad[0], trainer.epoch)
        return None
    return {"epoch": trainer.epoch, "train_loss": train_loss, **metrics}


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {name: result[name] for name in METRICS}


def _format(result: dict[str, Any]) -> str:
    return " ".join(f"{name}={result[name]:.4f}" for name in ("train_loss", *METRICS))
