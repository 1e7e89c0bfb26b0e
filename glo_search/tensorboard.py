"""TensorBoard event files of one training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from glo_search.config import TrainConfig
from glo_search.metrics import METRICS


class TrainingLog:
    """Scalars of every metric each epoch, under ``metrics/<name>``."""

    def __init__(self, folder: str | Path, config: TrainConfig) -> None:
        self.config = config
        self.writer = SummaryWriter(str(folder))

    def write_epoch(self, epoch: int, result: dict[str, Any]) -> None:
        for name in METRICS:
            self.writer.add_scalar(f"metrics/{name}", result[name], epoch)
        self.writer.add_scalar("train/loss", result["train_loss"], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
