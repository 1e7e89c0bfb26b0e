"""TensorBoard event files of one training run."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from glo_search import config as config_module
from glo_search.config import TrainConfig
from glo_search.metrics import METRICS, metric_mode

if TYPE_CHECKING:
    from glo_search.probes import ProbeSet
    from glo_search.trainer import Trainer

# Choices shown as drop-down filters in TensorBoard's hparams view.
DISCRETE_HPARAMS = {
    "loss": list(config_module.LOSSES),
    "generator": list(config_module.GENERATORS),
    "dataset": list(config_module.DATASETS),
    "split": list(config_module.SPLITS),
}


class TrainingLog:
    """Scalars, probe images and the hparams view of one run.

    - Scalars each epoch: every metric under ``metrics/<name>``, the objective under
      ``train/loss`` and the best value so far of ``metric`` under ``best/<metric>``.
    - Images, when :meth:`write_epoch` gets the trainer: ``probes/grid`` (every probe
      row) and ``probes/activations_<criterion>`` every ``config.probe_every`` epochs and
      at the last epoch. The same images go under ``best/`` at each new best epoch by
      ``metric``, so the last ``best/`` step shows the best checkpoint.
    - The hparams view: every config field as a hyperparameter, and as its metrics the
      latest values of the scalars above, which are the final ones once the run ends.
    """

    def __init__(
        self, folder: str | Path, config: TrainConfig, metric: str = "disentanglement"
    ) -> None:
        self.config = config
        self.metric = metric
        self.mode = metric_mode(metric)
        # NOTE: a trial resumed from a checkpoint starts a new log with no best, so its
        # first epoch after the resume writes best/ images whether or not it is the best.
        self.best: float | None = None
        self.probe_set: ProbeSet | None = None
        self.closed = False
        self.writer = SummaryWriter(str(folder))
        self._write_hparams()

    def _write_hparams(self) -> None:
        values = self.config.to_dict()
        discrete = {k: v for k, v in DISCRETE_HPARAMS.items() if k in values}
        experiment, session_start, self._session_end = hparams(
            values, dict.fromkeys(self.hparams_metrics(), 0.0), discrete
        )
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)

    def hparams_metrics(self) -> list[str]:
        """Scalar tags that the hparams view shows as the run's metrics."""
        return [f"metrics/{name}" for name in METRICS] + [f"best/{self.metric}", "train/loss"]

    def write_epoch(
        self, epoch: int, result: dict[str, Any], trainer: Trainer | None = None
    ) -> bool:
        """Write the epoch's scalars and, given the trainer, any images due this epoch.

        Returns whether the epoch is the best so far by ``metric``.
        """
        for name in METRICS:
            self.writer.add_scalar(f"metrics/{name}", result[name], epoch)
        self.writer.add_scalar("train/loss", result["train_loss"], epoch)
        new_best = self._update_best(result[self.metric])
        if self.best is not None:
            self.writer.add_scalar(f"best/{self.metric}", self.best, epoch)
        if trainer is not None and self.config.probe_every > 0:
            every = self.config.probe_every
            prefixes = []
            if epoch % every == 0 or epoch == self.config.epochs:
                prefixes.append("probes")
            if new_best:
                prefixes.append("best")
            self.write_images(trainer, prefixes, epoch)
        self.writer.flush()
        return new_best

    def _update_best(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            return True
        return False

    def write_images(self, trainer: Trainer, prefix: str | list[str], epoch: int) -> None:
        """Write the probe grid and activation grids under ``<prefix>/``, for each prefix
        of a list, from one pass of the generator."""
        from glo_search import probes

        prefixes = [prefix] if isinstance(prefix, str) else prefix
        if not prefixes:
            return
        if self.probe_set is None:
            self.probe_set = probes.dataset_probes(trainer.dataset, self.config.seed)
        for name, image in probes.probe_images(trainer, self.probe_set).items():
            encoded = encode_image(image)  # once for every prefix
            for tag_prefix in prefixes:
                value = Summary.Value(tag=f"{tag_prefix}/{name}", image=encoded)
                self.writer.file_writer.add_summary(Summary(value=[value]), epoch)

    def close(self) -> None:
        """Write the end of the run and close the file. Later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()


def encode_image(image: torch.Tensor) -> Summary.Image:
    """Encode a (1, H, W) image in [0, 1] as TensorBoard's image record: an 8-bit grey PNG.

    The pixels are those of SummaryWriter.add_image (scaled by 255 and truncated). That
    method also copies a grey image into three channels and resamples it to its own size
    before encoding. Encoding the five probe images of an epoch took it 10.6 ms, against
    6.8 ms here (one core of a 2-core AMD EPYC VM, busy with other work).
    """
    pixels = (image[0].numpy().astype(np.float32) * 255).clip(0, 255).astype(np.uint8)
    output = io.BytesIO()
    Image.fromarray(pixels).save(output, format="PNG")
    height, width = pixels.shape
    return Summary.Image(
        height=height, width=width, colorspace=1, encoded_image_string=output.getvalue()
    )
