"""GLO trainer: one epoch step, evaluation, save and load. It does not import Ray."""

from __future__ import annotations

import io
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from glo_search import classifier as digit_classifier
from glo_search import metrics as m
from glo_search.config import TrainConfig, from_dict
from glo_search.data import Dataset, DatasetCache
from glo_search.io import atomic_write_bytes
from glo_search.losses import build_loss
from glo_search.model import GloGenerator, LatentCodes, build_generator
from glo_search.optim import Adam
from glo_search.step import FusedAdamSteps, GloStep, decode, supported
from glo_search.step import reconstruction_error as decoded_recon_error

logger = logging.getLogger(__name__)

# Images per generator call in evaluation, by device type. On a CPU, small chunks keep the
# intermediate maps in cache. Decoding 3,350 codes on one core of a 2-core Zen 4 VM took
# 0.070 s in chunks of 32 and 0.10-0.14 s in chunks of 128. The C kernels now keep each
# image's maps in cache themselves: on a Zen 1 VM, chunks of 32 to 512 all took 0.14-0.15
# s, against 0.28-0.37 s before. A GPU wants large chunks.
EVAL_BATCH = {"cpu": 32}
DEFAULT_EVAL_BATCH = 4096
# Images per reference-classifier call in evaluation, by device type. On one CPU core,
# chunks of 64 classified the swaps 0-8% faster than chunks of 128 and twice as fast as
# chunks of 2,048, before the second convolution became a C kernel; since then all
# three take about as long (classifier.predict).
CLASSIFIER_BATCH = {"cpu": 64}
CHECKPOINT_FILE = "trainer.pt"


def evaluation_due(epoch: int, config: TrainConfig, milestones: Collection[int] = ()) -> bool:
    """Return whether metrics are computed after ``epoch``.

    They are every ``config.eval_every`` epochs, at the last epoch and at each of
    ``milestones`` (a sweep passes its ASHA rung epochs, where trials are compared).
    """
    return epoch % config.eval_every == 0 or epoch >= config.epochs or epoch in milestones


# The swaps and the style attributes of their source images, by dataset object,
# swap_sources and seed. Computing them took about 0.1 s per trial.
_SWAP_CACHE = DatasetCache()


def swap_setup(dataset: Dataset, swap_sources: int, seed: int) -> tuple[m.Swaps, torch.Tensor]:
    """Return the cross-class swaps of the metrics and their sources' style attributes,
    computed once per dataset object and settings."""

    def compute() -> tuple[m.Swaps, torch.Tensor]:
        swaps = m.build_swaps(dataset.labels, swap_sources, seed)
        return swaps, m.style_attributes(dataset.images[swaps.sources])

    return _SWAP_CACHE.get(dataset, (swap_sources, seed), compute)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Train a GLO model on a dataset held whole on the device.

    ``classifier_state`` is the reference digit classifier's state dict; without it,
    class_fidelity and disentanglement are reported as NaN.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        classifier_state: dict[str, torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device) if device else default_device()
        self.dataset = dataset
        self.epoch = 0
        torch.manual_seed(config.seed)
        init_rng = torch.Generator().manual_seed(config.seed)
        self.images = dataset.images.to(self.device)  # (N, 1, 28, 28)
        self.labels = dataset.labels.to(self.device)  # (N,)
        self.generator = build_generator(
            config.generator, config.class_dim, config.content_dim
        ).to(self.device)
        self.codes = LatentCodes(
            len(dataset),
            dataset.num_classes,
            config.content_dim,
            config.class_dim,
            init_rng,
        ).to(self.device)
        # The fused kernel updates every parameter in one call. As with the per-tensor Adam,
        # the content-code table gets a dense gradient every step, zero outside the batch.
        # glo_search.optim.Adam is torch.optim.Adam without the import of torch._dynamo.
        self.optimizer = Adam(
            [
                {"params": self.generator.parameters(), "lr": config.lr_generator},
                {"params": self.codes.parameters(), "lr": config.lr_latent},
            ],
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.loss_fn = build_loss(
            config.loss, classifier_state, config.perceptual_weights, self.device
        )
        # On a CPU, the glo generator with a pixel loss trains by a hand-written step. It
        # was tuned on CPUs and has not been measured on a GPU, which keeps autograd.
        self.step = None
        if self.device.type == "cpu" and supported(self.generator, config.loss):
            self.step = GloStep(self.generator, self.codes, config.loss)
        self.order_rng = torch.Generator().manual_seed(config.seed + 1)
        self.noise_rng = torch.Generator(self.device).manual_seed(config.seed + 2)
        self.classifier = None
        if classifier_state:
            self.classifier = digit_classifier.build(classifier_state, self.device)
        self.swaps, self.source_attributes = swap_setup(dataset, config.swap_sources, config.seed)

    def train_epoch(self) -> float:
        """Run one pass over the images in a seeded random order; return the mean objective."""
        config = self.config
        self.generator.train()
        order = torch.randperm(len(self.labels), generator=self.order_rng).to(self.device)
        # Gather the epoch's images, labels and noise once, so that each step slices views.
        images = self.images[order]  # (N, 1, 28, 28)
        labels = self.labels[order]  # (N,)
        noise = None
        if config.noise_std > 0:
            noise = torch.randn(
                (len(order), config.content_dim), generator=self.noise_rng, device=self.device
            )
            noise.mul_(config.noise_std)
        total = torch.zeros((), device=self.device)
        if self.step is not None:
            self.step.allocate_gradients()
        update = FusedAdamSteps(self.optimizer)
        for start in range(0, len(order), config.batch_size):
            stop = start + config.batch_size
            batch = (order[start:stop], labels[start:stop], images[start:stop])
            batch_noise = None if noise is None else noise[start:stop]
            if self.step is not None:
                loss = self.step(*batch, batch_noise, config.content_decay)
                update()
            else:
                loss = self._autograd_step(*batch, batch_noise)
            total += loss * len(batch[0])
        self.epoch += 1
        return (total / len(self.labels)).item()

    def _autograd_step(
        self,
        indices: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        content = self.codes.content[indices]  # (B, content_dim)
        class_code = self.codes.classes[labels]  # (B, class_dim)
        noisy = content if noise is None else content + noise
        loss = self.loss_fn(self.generator(class_code, noisy), images)
        if self.config.content_decay > 0:
            loss = loss + self.config.content_decay * content.pow(2).sum(dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def generate(self, class_codes: torch.Tensor, content_codes: torch.Tensor) -> torch.Tensor:
        """Decode codes in evaluation mode (no noise, batch-norm running statistics)."""
        was_training = self.generator.training
        self.generator.eval()
        chunk = EVAL_BATCH.get(self.device.type, DEFAULT_EVAL_BATCH)
        generator = self.generator
        if self._decodes_by_stages():
            outputs = decode(generator, class_codes, content_codes, chunk)
        else:
            outputs = torch.cat(
                [
                    generator(c, z)
                    for c, z in zip(
                        class_codes.split(chunk), content_codes.split(chunk), strict=True
                    )
                ]
            )
        self.generator.train(was_training)
        return outputs  # (N, 1, 28, 28)

    def reconstruct(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        indices = torch.arange(len(self.labels)) if indices is None else indices
        indices = indices.to(self.device)
        return self.generate(self.codes.classes[self.labels[indices]], self.codes.content[indices])

    @torch.no_grad()
    def reconstruction_error(self) -> float:
        """Return ``recon_error``: the pixel error of every training image's reconstruction
        from its clean codes, in evaluation mode."""
        class_codes = self.codes.classes.detach()[self.labels]
        content_codes = self.codes.content.detach()
        if self._decodes_by_stages():
            chunk = EVAL_BATCH[self.device.type]
            return decoded_recon_error(
                self.generator, class_codes, content_codes, self.images, chunk
            )
        return m.recon_error(self.generate(class_codes, content_codes), self.images)

    def _decodes_by_stages(self) -> bool:
        return self.device.type == "cpu" and type(self.generator) is GloGenerator

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Compute every metric of :data:`glo_search.metrics.METRICS` and the nearest classes."""
        class_codes = self.codes.classes.detach()
        content_codes = self.codes.content.detach()
        targets = self.swaps.targets.to(self.device)
        recon = self.reconstruction_error()
        swap_outputs = self.generate(
            class_codes[targets], content_codes[self.swaps.sources.to(self.device)]
        )  # (M, 1, 28, 28)
        nearest = m.nearest_classes(class_codes.cpu())
        if self.classifier is not None:
            chunk = CLASSIFIER_BATCH.get(self.device.type, DEFAULT_EVAL_BATCH)
            predicted = digit_classifier.predict(self.classifier, swap_outputs, chunk)
            fidelity = m.class_fidelity(predicted, self.swaps.targets)
        else:
            fidelity = float("nan")
        transfer = m.style_transfer(
            self.source_attributes,
            m.style_attributes(swap_outputs).cpu(),
            self.swaps.targets,
        )
        leakage = m.content_leakage(content_codes, self.labels, self.config.seed)
        results: dict[str, Any] = {
            "recon_error": recon,
            "ideal_neighbour_accuracy": m.ideal_neighbour_accuracy(nearest),
            "class_fidelity": fidelity,
            "style_transfer": transfer,
            "disentanglement": fidelity * transfer,
            "content_leakage": leakage,
        }
        results.update({f"nearest_{k}": int(j) for k, j in enumerate(nearest)})
        return results

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "generator": self.generator.state_dict(),
            "codes": self.codes.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "order_rng": self.order_rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.generator.load_state_dict(state["generator"])
        self.codes.load_state_dict(state["codes"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order_rng.set_state(state["order_rng"])
        try:
            self.noise_rng.set_state(state["noise_rng"])
        except RuntimeError:
            # A CUDA generator's state does not fit a CPU generator (and the reverse), so a
            # checkpoint moved between devices continues with a fresh, seeded noise stream.
            logger.warning(
                "noise generator state of the checkpoint does not fit device %s; "
                "reseeding it, so the noise after epoch %d differs from the original run",
                self.device,
                self.epoch,
            )
            self.noise_rng.manual_seed(self.config.seed + 2 + self.epoch)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the trainer state (and extra plain values) atomically with torch.save."""
        buffer = io.BytesIO()
        torch.save({**self.state_dict(), "extra": extra or {}}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(
        cls,
        path: str | Path,
        dataset: Dataset,
        classifier_state: dict[str, torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> Trainer:
        """Rebuild a trainer from a file written by :meth:`save` (weights_only loading)."""
        state = read_checkpoint(path)
        trainer = cls(from_dict(state["config"]), dataset, classifier_state, device)
        trainer.load_state_dict(state)
        return trainer


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)
