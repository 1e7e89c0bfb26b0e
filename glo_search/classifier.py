"""Reference digit classifier that judges generated digits (class_fidelity).

It is a small CNN trained by the project on shipped test-split digits outside the
default training subset (the first 2,000), scored on a held-out part of them, and cached
with its accuracy in ``classifier.json`` beside the weights.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glo_search import data, native
from glo_search.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

VERSION = 1  # bump when the architecture, data or training below change
TRAIN_RANGE = (2000, 9000)  # shipped test-split indices used for training
HELD_OUT_RANGE = (9000, 10000)  # shipped test-split indices used for the accuracy
MIN_ACCURACY = 0.97
EPOCHS = 10
BATCH_SIZE = 64
SEED = 1234


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Max-pooling before ReLU gives the same values and gradients as ReLU before
        # max-pooling, because ReLU is monotonic, and ReLU then runs on a quarter of them.
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.MaxPool2d(2),  # (B, 32, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3),
            nn.MaxPool2d(2),  # (B, 64, 5, 5)
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, 10) logits


@dataclass(frozen=True)
class ClassifierInfo:
    """Record of the cached classifier: its held-out accuracy and the digits it saw."""

    version: int
    held_out_accuracy: float
    train_indices: tuple[int, int]
    held_out_indices: tuple[int, int]
    epochs: int
    weights: str


def cache_dir() -> Path:
    """Folder of cached files: $GLO_SEARCH_CACHE, else ~/.cache/glo-search."""
    root = os.environ.get("GLO_SEARCH_CACHE") or Path.home() / ".cache" / "glo-search"
    return Path(root)


def _paths(folder: Path) -> tuple[Path, Path]:
    stem = f"digit-classifier-v{VERSION}"
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def _train(images: torch.Tensor, labels: torch.Tensor) -> DigitClassifier:
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            augmented = _random_affine(images[batch], generator)
            loss = F.cross_entropy(model(augmented), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        logger.info("digit classifier: epoch %d/%d done", epoch + 1, EPOCHS)
    return model.eval()


def _random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate by up to 10 degrees and shift by up to 2 pixels, so that slightly
    off-centre or tilted generated digits are still judged by their shape."""
    count = len(images)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(10)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2 / 14)  # 2 px of 28
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[:, 0]], 1),
            torch.stack([sin, cos, shift[:, 1]], 1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return predicted labels (N,) for images (N, 1, 28, 28).

    On one core of a 2-core AMD EPYC VM (Zen 4), with only the first layer in C, chunks
    of 2,048 images took twice as long as chunks of 32-128, because a small chunk's maps
    stay in cache. With both convolutions in C, the second by Winograd's algorithm, on a
    Zen 1 VM, chunks of 32 to 2,048 took 0.115-0.127 s for 1,350 images
    (``benchmarks/speed.py classifier``).
    """
    # The convolutions follow the layout of build()'s channels-last weights. Images of
    # other strides are copied to channels-last first (a no-op for a (N, 1, H, W) tensor).
    images = images.contiguous(memory_format=torch.channels_last)
    forward = _native_forward(model, images) or model
    chunks = [forward(chunk).argmax(1) for chunk in images.split(batch_size)]
    return torch.cat(chunks)


def _native_forward(model: nn.Module, images: torch.Tensor):
    """Return the classifier's forward pass with each convolution, its pooling and ReLU
    as one C kernel (glo_search.native), or None where those kernels do not apply.

    The kernels keep the 32x26x26 and 64x10x10 maps of the convolutions out of memory.
    The first computes only the first 12x12 of the 13x13 pooled maps: the second
    convolution's 11x11 outputs then shrink to the 10x10 that its 2x2 max-pool reads,
    with the same values. On one core of a 2-core AMD EPYC VM (Zen 4), the first kernel
    took the classifier from 0.100 s to 0.070 s on 1,350 images, in chunks of 64.

    The second kernel computes its convolution by Winograd's F(2x2, 3x3) algorithm, whose
    2x2 output tiles are the max-pool's windows, with 2.25 times fewer multiplications
    than the direct convolution. Its filter, 16 floats per 3x3 kernel, is transformed
    once per call here (_winograd_filter). On one core of a 2-core AMD EPYC VM (Zen 1),
    on 1,350 images in chunks of 64, it took 0.071 s where the direct convolution's
    kernel took 0.138 s, and the classifier took 0.117 s instead of 0.188 s.

    Where the compiler targets AVX-512, both kernels take 16 floats per vector, with the
    same bits (tests/test_native.py). On one core of a 2-core Intel Xeon VM the classifier
    then took 0.031 s instead of 0.044 s for 1,350 images in chunks of 64.
    """
    first = model.features[0] if type(model) is DigitClassifier else None
    second = model.features[3] if first is not None else None
    usable = (
        first is not None
        and images.device.type == first.weight.device.type == "cpu"
        and images.dtype == first.weight.dtype == torch.float32
        and images.shape[1:] == (1, 28, 28)
        and first.out_channels == 32  # the kernels' channel counts
        and second.weight.shape == (64, 32, 3, 3)
    )
    lib = native.kernels() if usable else None
    if lib is None:
        return None
    channels = first.out_channels
    weight = first.weight.reshape(channels, 9).t().contiguous()  # (tap, channel)
    winograd_filter = _winograd_filter(second.weight)

    def forward(chunk: torch.Tensor) -> torch.Tensor:
        pooled = chunk.new_empty(len(chunk), 12, 12, channels)
        lib.conv_pool_relu(
            chunk.contiguous(), weight, first.bias, pooled, len(chunk), 28, 28, 12, 12
        )
        maps = chunk.new_empty(len(chunk), 64, 5, 5)
        lib.winograd_conv_pool_relu(pooled, winograd_filter, second.bias, maps, len(chunk), 12, 12)
        return model.head(maps)

    return forward


def _winograd_filter(weight: torch.Tensor) -> torch.Tensor:
    """Transform a convolution's weight (out, in, 3, 3) into the filter of Winograd's
    F(2x2, 3x3) algorithm that the C kernel winograd_conv_pool_relu takes: U = G g G^T for
    each 3x3 kernel g, as (16, in, out) float32 [xi][in][out], xi = 4 * row + column of U.

    It is computed in float64, so that the only rounding is the final one to float32.
    """
    transform = torch.tensor(  # G
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    u = torch.einsum("ar,bs,oirs->abio", transform, transform, weight.double())
    return u.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


def train_and_cache(folder: Path) -> ClassifierInfo:
    images, labels = data.load_shipped()
    train = slice(*TRAIN_RANGE)
    held_out = slice(*HELD_OUT_RANGE)
    logger.info(
        "training the reference digit classifier on %d shipped digits (once, cached in %s)",
        TRAIN_RANGE[1] - TRAIN_RANGE[0],
        folder,
    )
    model = _train(images[train], labels[train])
    accuracy = (predict(model, images[held_out]) == labels[held_out]).float().mean().item()
    weights_path, info_path = _paths(folder)
    info = ClassifierInfo(
        VERSION,
        round(accuracy, 4),
        TRAIN_RANGE,
        HELD_OUT_RANGE,
        EPOCHS,
        str(weights_path),
    )
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(
            f"reference digit classifier reached held-out accuracy {accuracy:.4f}, "
            f"below the required {MIN_ACCURACY}; class_fidelity would not be trustworthy"
        )
    folder.mkdir(parents=True, exist_ok=True)
    buffer = _state_bytes(model)
    atomic_write_bytes(weights_path, buffer)
    atomic_write_text(info_path, json.dumps(asdict(info), indent=2) + "\n")
    logger.info("digit classifier held-out accuracy: %.4f", accuracy)
    return info


def _state_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load_info(folder: Path | None = None) -> ClassifierInfo:
    """Return the cached classifier's info, training and caching it on first use."""
    folder = folder or cache_dir()
    weights_path, info_path = _paths(folder)
    if weights_path.is_file() and info_path.is_file():
        try:
            values = json.loads(info_path.read_text())
            values["train_indices"] = tuple(values["train_indices"])
            values["held_out_indices"] = tuple(values["held_out_indices"])
            values["weights"] = str(weights_path)  # where it is now, if the cache moved
            return ClassifierInfo(**values)
        except (ValueError, KeyError, TypeError):
            logger.warning("cached classifier info %s is unreadable; retraining", info_path)
    return train_and_cache(folder)


def load_state(folder: Path | None = None) -> dict[str, torch.Tensor]:
    """Return the classifier's state dict (training it on first use)."""
    folder = folder or cache_dir()
    load_info(folder)
    weights_path, _ = _paths(folder)
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def build(state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> DigitClassifier:
    """Return the classifier in evaluation mode, frozen, with channels-last weights.

    The convolutions then run channels-last. On one core of a 2-core AMD EPYC VM, 2,700
    swaps took 0.19-0.20 s that way and 0.5-0.85 s with weights and images in the default
    layout (``benchmarks/speed.py classifier``).
    """
    model = DigitClassifier()
    model.load_state_dict(state)
    model = model.to(device, memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)
