"""MNIST digits: the test split shipped with the package, or torchvision's MNIST.

The shipped files are the MNIST test split (10,000 digits) in IDX format, gzip-compressed,
under ``glo_search/mnist_data`` with their license note (CC BY-SA 3.0).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import struct
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glo_search.config import TrainConfig

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "mnist_data"
SHIPPED_IMAGES = SHIPPED_DIR / "t10k-images-idx3-ubyte.gz"
SHIPPED_LABELS = SHIPPED_DIR / "t10k-labels-idx1-ubyte.gz"
# SHA-256 of the shipped files, checked before a run reads only the first digits of them.
SHIPPED_SHA256 = {
    SHIPPED_IMAGES.name: "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
    SHIPPED_LABELS.name: "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
}
IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension
NUM_CLASSES = 10


class DataError(ValueError):
    """A data file that is missing, truncated or not in the expected format."""


@dataclass(frozen=True)
class Dataset:
    """Training digits held as whole tensors, so batches are plain index operations."""

    images: torch.Tensor  # (N, 1, 28, 28) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    name: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


class DatasetCache:
    """Values computed from a Dataset, kept by dataset object and key.

    The trials that a reused Ray worker runs share one Dataset object, so they compute
    such values once. An entry counts only for the object it was computed from, even when
    another object later gets the same id(). The cache empties when it reaches ``size``
    entries.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: dict[tuple[int, Hashable], tuple[Dataset, Any]] = {}

    def get(self, dataset: Dataset, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Return the value cached for dataset and key, or compute and cache it."""
        entry = self._entries.get((id(dataset), key))
        if entry is not None and entry[0] is dataset:
            return entry[1]
        value = compute()
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[(id(dataset), key)] = (dataset, value)
        return value


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed when the name ends in .gz)."""
    return _read_idx_head(Path(path), expected_magic, None)[0]


def _read_idx_head(path: Path, expected_magic: int, count: int | None) -> tuple[np.ndarray, int]:
    """Return the first ``count`` items of an IDX file (all with None) and its item count.

    A partial read decompresses only the items returned, so it cannot check the gzip
    CRC, which covers the whole stream: callers check the file's digest first.
    """
    if not path.is_file():
        raise DataError(f"MNIST file not found: {path}")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4:
                raise DataError(f"{path}: {len(header)} bytes, too short for an IDX header")
            magic = struct.unpack(">I", header)[0]
            if magic != expected_magic:
                raise DataError(
                    f"{path}: IDX magic number {magic}, expected {expected_magic} "
                    "(is this the right file, and not corrupt?)"
                )
            ndim = magic & 0xFF
            header += f.read(4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise DataError(f"{path}: {len(header)} bytes, too short for an IDX header")
            shape = struct.unpack(f">{ndim}I", header[4:])
            item_size = int(np.prod(shape[1:]))
            if count is None:
                items, body = shape[0], f.read()  # to the end, where gzip checks its CRC
            else:
                items = min(count, shape[0])
                body = f.read(items * item_size)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read MNIST file {path}: {error}") from error
    if len(body) != items * item_size:
        expected_size = len(header) + int(np.prod(shape))
        raise DataError(
            f"{path}: {len(header) + len(body)} bytes, expected {expected_size} for shape {shape}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape((items, *shape[1:])), shape[0]


@functools.cache
def _check_digest(path: Path, size: int, mtime_ns: int) -> None:
    """Raise DataError unless the shipped file at path has its known SHA-256.

    The size and modification time only key the cache, so that a process checks each
    version of a file once (2-3 ms for the images).
    """
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = SHIPPED_SHA256[path.name]
    if digest != expected:
        raise DataError(
            f"{path} is damaged: its SHA-256 is {digest}, expected {expected}; "
            "reinstall glo-search to restore it"
        )


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return pixels, torch.from_numpy(labels.astype(np.int64))


def load_shipped(
    images_path: str | Path = SHIPPED_IMAGES, labels_path: str | Path = SHIPPED_LABELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the whole shipped test split: images (10000, 1, 28, 28) and labels."""
    images, labels, _ = _shipped_arrays(images_path, labels_path)
    return _to_tensors(images, labels)


def _shipped_arrays(
    images_path: str | Path = SHIPPED_IMAGES,
    labels_path: str | Path = SHIPPED_LABELS,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return the first ``count`` images and labels (all with None) and the split's size.

    Only the shipped files are read in part, after their digests are checked. Other
    files are read whole, so that gzip checks their CRC.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    if (images_path, labels_path) != (SHIPPED_IMAGES, SHIPPED_LABELS):
        count = None
    if count is not None:
        for path in (images_path, labels_path):
            if path.is_file():
                status = path.stat()
                _check_digest(path, status.st_size, status.st_mtime_ns)
    images, total = _read_idx_head(images_path, IMAGES_MAGIC, count)
    labels, label_total = _read_idx_head(labels_path, LABELS_MAGIC, count)
    if total != label_total:
        raise DataError(
            f"{images_path} has {total} images but {labels_path} has {label_total} labels"
        )
    return images, labels, total


def _torchvision_arrays(
    root: str, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Load torchvision's MNIST split from root as uint8 arrays, with its size, downloading
    it only when asked."""
    from torchvision.datasets import MNIST

    try:
        mnist = MNIST(root, train=split == "train", download=download)
    except RuntimeError as error:
        if "not found" not in str(error):
            raise _corrupt(root, split, error) from error
        prefix = "train" if split == "train" else "t10k"
        expected = Path(root) / "MNIST" / "raw" / f"{prefix}-{{images-idx3,labels-idx1}}-ubyte"
        hint = "" if download else "; add --download to fetch it (needs a network)"
        raise DataError(
            f"MNIST {split} split not found under {root!r}: torchvision expects {expected}{hint}"
        ) from error
    except (AssertionError, ValueError) as error:  # torchvision's IDX parser asserts
        raise _corrupt(root, split, error) from error
    except OSError as error:  # network failures during download
        raise DataError(f"downloading MNIST into {root!r} failed: {error}") from error
    return mnist.data.numpy(), mnist.targets.numpy(), len(mnist.targets)


def _corrupt(root: str, split: str, error: Exception) -> DataError:
    detail = f"{type(error).__name__}: {error}".rstrip(": ")
    return DataError(
        f"MNIST {split} split under {root!r} is not valid IDX data ({detail}); delete "
        "the files under MNIST/raw and fetch them again with --download"
    )


def _split_arrays(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Return at least the first config.num_images digits of the split, and its size."""
    if config.dataset == "shipped":
        return _shipped_arrays(SHIPPED_IMAGES, SHIPPED_LABELS, count=config.num_images)
    return _torchvision_arrays(config.data_root, config.split, config.download)


def load_dataset(config: TrainConfig) -> Dataset:
    """Return the first config.num_images digits of the configured split."""
    images, labels, total = _split_arrays(config)
    if config.num_images > total:
        raise DataError(
            f"num_images={config.num_images} but the {config.dataset} "
            f"{config.split} split has {total} images; lower --num-images"
        )
    name = f"{config.dataset}-{config.split}[:{config.num_images}]"
    # Only the digits used are converted to floats. For 2,000 of the 10,000 shipped digits,
    # a process's first load took 0.034-0.035 s against 0.041-0.090 s (2-core AMD EPYC VM).
    n = config.num_images
    return Dataset(*_to_tensors(images[:n], labels[:n]), name)
