"""Checkpoints never unpickle code, and Ray's dashboard is off unless asked for."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glo_search.cli import build_parser
from glo_search.config import ConfigError, TrainConfig
from glo_search.search import dashboard_dependency_error, ray_init_options
from glo_search.trainer import Trainer, read_checkpoint

HAS_DASHBOARD = dashboard_dependency_error() is None


class _TouchOnLoad:
    """Unpickling this object creates a file: the proof that code ran during loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_object_rejected(tmp_path, small_dataset):
    marker = tmp_path / "code-ran"
    trainer = Trainer(TrainConfig(num_images=200, swap_sources=20), small_dataset, device="cpu")
    state = {**trainer.state_dict(), "extra": {"payload": _TouchOnLoad(marker)}}
    path = tmp_path / "trainer.pt"
    torch.save(state, path)

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        Trainer.load(path, small_dataset, device="cpu")
    assert not marker.exists()


def test_checkpoint_plain_values_load(tmp_path, small_dataset):
    trainer = Trainer(TrainConfig(num_images=200, swap_sources=20), small_dataset, device="cpu")
    trainer.save(tmp_path / "trainer.pt", extra={"metrics": {"disentanglement": 0.5}})
    assert read_checkpoint(tmp_path)["extra"] == {"metrics": {"disentanglement": 0.5}}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], None), (["--dashboard"], "127.0.0.1"), (["--dashboard", "0.0.0.0"], "0.0.0.0")],
)
def test_dashboard_flag(argv, expected):
    for command in ("sweep", "resume"):
        target = ["somewhere"] if command == "resume" else []
        args = build_parser().parse_args([command, *target, *argv])
        assert args.dashboard == expected


def test_dashboard_off_by_default():
    options = ray_init_options(None, 2, None)
    assert options["include_dashboard"] is False
    assert options["address"] == "local"


def test_dashboard_with_cluster_address_rejected():
    with pytest.raises(ConfigError, match="ray start --dashboard-host"):
        ray_init_options("127.0.0.2:6379", None, "127.0.0.1")


@pytest.mark.skipif(HAS_DASHBOARD, reason="Ray's dashboard packages are installed")
def test_dashboard_without_packages_names_install():
    with pytest.raises(ConfigError, match=r"pip install 'ray\[default\]'"):
        ray_init_options(None, 2, "127.0.0.1")


START_WITH_DASHBOARD = """
import sys
import ray
from glo_search.search import ray_init_options
context = ray.init(**ray_init_options(None, 1, sys.argv[1]))
print(context.dashboard_url)
ray.shutdown()
"""


@pytest.mark.skipif(not HAS_DASHBOARD, reason="needs pip install 'ray[default]'")
def test_dashboard_binds_loopback(tmp_path):
    # A process of its own: the session's Ray instance runs without a dashboard.
    result = subprocess.run(
        [sys.executable, "-c", START_WITH_DASHBOARD, "127.0.0.1"],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1].startswith("127.0.0.1:")
