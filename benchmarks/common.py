"""Helpers shared by the benchmark scripts: the machine, timing and the plain training loop."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from glo_search.config import TrainConfig  # noqa: E402
from glo_search.data import Dataset  # noqa: E402
from glo_search.losses import build_loss  # noqa: E402
from glo_search.model import ACTIVATION_CHANNELS, GloGenerator, build_generator  # noqa: E402
from glo_search.trainer import Trainer  # noqa: E402


def machine() -> str:
    """Describe the CPU, its core count, torch's thread count and the load average."""
    model = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lines.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# The clock of timed(): wall-clock time, or this process's CPU time (use_cpu_clock).
CLOCK = {"now": time.perf_counter}


def use_cpu_clock() -> None:
    """Time calls by this process's CPU seconds instead of wall-clock seconds.

    With one torch thread and nothing else running, the two agree. When other jobs share
    the cores, CPU time leaves out the time this process waited for a core.
    """
    if torch.get_num_threads() != 1:
        raise SystemExit("--cpu-time needs --threads 1: CPU time adds up every thread's time")
    CLOCK["now"] = time.process_time


def timed(function: Callable[[], object]) -> float:
    """Return the seconds of one call, by the clock in CLOCK (wall-clock by default)."""
    now = CLOCK["now"]
    started = now()
    function()
    return now() - started


def interleaved(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Time each case once per round, alternating cases, so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, function in cases.items():
            times[name].append(timed(function))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def reference_forward(generator: GloGenerator, class_code, content_code) -> torch.Tensor:
    """The ``glo`` generator through its nn.Sequential modules, as a plain loop would run it."""
    hidden = generator.fc(torch.cat([class_code, content_code], dim=1))
    return generator.to_28(generator.to_14(hidden.view(-1, ACTIVATION_CHANNELS, 5, 5)))


class PlainLoop:
    """The trainer's model, loss, batch size and initial values trained the plain way.

    A DataLoader over (index, image, label) with shuffling, nn.Embedding code tables,
    the generator's nn.Sequential modules (upsampling, then ConvTranspose2d) and Adam
    with its default per-tensor implementation: one Python step per batch.
    """

    def __init__(self, config: TrainConfig, dataset: Dataset) -> None:
        reference = Trainer(config, dataset, device="cpu")  # for identical initial values
        self.config = config
        self.generator = build_generator(config.generator, config.class_dim, config.content_dim)
        self.generator.load_state_dict(reference.generator.state_dict())
        self.content = nn.Embedding.from_pretrained(reference.codes.content.detach(), False)
        self.classes = nn.Embedding.from_pretrained(reference.codes.classes.detach(), False)
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.generator.parameters(), "lr": config.lr_generator},
                {
                    "params": [self.content.weight, self.classes.weight],
                    "lr": config.lr_latent,
                },
            ]
        )
        self.loss_fn = build_loss(config.loss)
        indices = torch.arange(len(dataset))
        self.loader = DataLoader(
            TensorDataset(indices, dataset.images, dataset.labels),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed + 1),
        )

    def train_epoch(self) -> None:
        self.generator.train()
        for index, image, label in self.loader:
            content = self.content(index)
            noisy = content + self.config.noise_std * torch.randn_like(content)
            output = reference_forward(self.generator, self.classes(label), noisy)
            loss = self.loss_fn(output, image)
            if self.config.content_decay > 0:
                loss = loss + self.config.content_decay * content.pow(2).sum(dim=1).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def to_trainer(self, dataset: Dataset, classifier_state) -> Trainer:
        """Return a Trainer holding this loop's weights and codes, to evaluate them."""
        trainer = Trainer(self.config, dataset, classifier_state, device="cpu")
        trainer.generator.load_state_dict(self.generator.state_dict())
        with torch.no_grad():
            trainer.codes.content.copy_(self.content.weight)
            trainer.codes.classes.copy_(self.classes.weight)
        return trainer
