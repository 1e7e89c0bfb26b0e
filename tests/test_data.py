import gzip
import struct

import pytest
import torch

from glo_search import data
from glo_search.config import TrainConfig
from glo_search.data import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    SHIPPED_LABELS,
    DataError,
    DatasetCache,
    load_dataset,
    load_shipped,
    read_idx,
)


def test_shipped_split_first_ten_labels():
    _, labels = load_shipped()
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_shipped_split_shape_and_range():
    images, labels = load_shipped()
    assert images.shape == (10000, 1, 28, 28)
    assert images.dtype == torch.float32
    assert images.min() == 0.0
    assert images.max() == 1.0
    assert torch.bincount(labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_load_dataset_takes_first_n():
    dataset = load_dataset(TrainConfig(num_images=50))
    images, labels = load_shipped()
    assert len(dataset) == 50
    assert dataset.labels.tolist() == labels[:50].tolist()
    # The digits are converted after the cut, and the pixels must equal the whole split's.
    assert torch.equal(dataset.images, images[:50])
    assert dataset.images.dtype == torch.float32
    assert dataset.labels.dtype == torch.int64


def test_dataset_cache_computes_once_per_object():
    first = load_dataset(TrainConfig(num_images=20))
    second = load_dataset(TrainConfig(num_images=20))
    cache = DatasetCache(size=2)
    calls = []

    def compute(tag):
        calls.append(tag)
        return tag

    assert cache.get(first, "a", lambda: compute("first a")) == "first a"
    assert cache.get(first, "a", lambda: compute("again")) == "first a"
    assert cache.get(first, "b", lambda: compute("first b")) == "first b"
    assert cache.get(second, "a", lambda: compute("second a")) == "second a"
    assert calls == ["first a", "first b", "second a"]
    # The third entry emptied the cache of size 2 first.
    assert cache.get(first, "a", lambda: compute("first a, computed again")) == (
        "first a, computed again"
    )


def test_load_dataset_too_many_images():
    with pytest.raises(DataError, match="num_images=20000"):
        load_dataset(TrainConfig(num_images=20000))


def _write_idx(path, magic, shape, payload):
    header = struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_read_idx_wrong_magic_names_file_and_expected(tmp_path):
    path = tmp_path / "labels.gz"
    _write_idx(path, IMAGES_MAGIC, (3, 1, 1), bytes(3))
    with pytest.raises(DataError) as error:
        read_idx(path, LABELS_MAGIC)
    assert str(path) in str(error.value)
    assert "expected 2049" in str(error.value)


def test_read_idx_truncated(tmp_path):
    path = tmp_path / "labels.gz"
    _write_idx(path, LABELS_MAGIC, (10,), bytes(4))
    with pytest.raises(DataError, match="expected 18"):
        read_idx(path, LABELS_MAGIC)


def test_read_idx_corrupt_gzip_fails_its_crc(tmp_path):
    path = tmp_path / "labels.gz"
    _write_idx(path, LABELS_MAGIC, (1000,), bytes(range(10)) * 100)
    compressed = bytearray(path.read_bytes())
    compressed[-8] ^= 0x01  # the CRC in the trailer
    path.write_bytes(bytes(compressed))
    with pytest.raises(DataError, match="CRC"):
        read_idx(path, LABELS_MAGIC)


def test_damaged_shipped_file_stops_a_partial_read(tmp_path, monkeypatch):
    """A run reads only the first digits, after checking the shipped files' digests."""
    for source in (data.SHIPPED_IMAGES, data.SHIPPED_LABELS):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    images = tmp_path / data.SHIPPED_IMAGES.name
    compressed = bytearray(images.read_bytes())
    compressed[5000] ^= 0x10  # decompresses without error, into other pixels
    images.write_bytes(bytes(compressed))
    monkeypatch.setattr(data, "SHIPPED_IMAGES", images)
    monkeypatch.setattr(data, "SHIPPED_LABELS", tmp_path / data.SHIPPED_LABELS.name)
    with pytest.raises(DataError, match="is damaged: its SHA-256 is"):
        load_dataset(TrainConfig(num_images=50))


def test_read_idx_cut_gzip_file(tmp_path):
    path = tmp_path / "labels.gz"
    _write_idx(path, LABELS_MAGIC, (1000,), bytes(range(10)) * 100)
    path.write_bytes(path.read_bytes()[:-12])  # the end of the stream and its trailer
    with pytest.raises(DataError, match=str(path)):
        read_idx(path, LABELS_MAGIC)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent.gz", LABELS_MAGIC)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path, LABELS_MAGIC)


def test_read_idx_shipped_labels():
    labels = read_idx(SHIPPED_LABELS, LABELS_MAGIC)
    assert labels.shape == (10000,)


def test_torchvision_missing_folder_without_download(tmp_path):
    config = TrainConfig(dataset="mnist", data_root=str(tmp_path), split="train")
    with pytest.raises(DataError, match="--download"):
        load_dataset(config)
