"""Warm-start points: reading the file and checking each point against the space."""

from __future__ import annotations

import json

import pytest
import yaml

from glo_search.config import ConfigError, TrainConfig
from glo_search.points import check_points, read_points
from glo_search.spaces import resolve

BASE = TrainConfig(num_images=100)
REFERENCE = {"class_dim": 5, "content_dim": 25, "noise_std": 0.3, "content_decay": 0.0}


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_read_points_json_and_yaml(tmp_path, suffix):
    path = tmp_path / f"points{suffix}"
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    path.write_text(dump([REFERENCE]))
    assert read_points(path) == [REFERENCE]


def test_reference_point_takes_lambda_zero_branch():
    # The default space reaches content_decay 0 only through its lambda = 0 branch.
    (point,) = check_points([REFERENCE], resolve("default", BASE), BASE, num_samples=4)
    assert point == {**REFERENCE, "_content_decay_on": False}


def test_point_may_leave_keys_to_sampler():
    (point,) = check_points([{"class_dim": 8}], resolve("default", BASE), BASE, num_samples=1)
    assert point["class_dim"] == 8


def test_point_outside_range_allowed():
    point = {**REFERENCE, "noise_std": 50.0}  # the default range ends at 10
    (checked,) = check_points([point], resolve("default", BASE), BASE, num_samples=1)
    assert checked["noise_std"] == 50.0


def test_point_of_report_grid_accepted():
    (point,) = check_points([REFERENCE], resolve("report", BASE), BASE, num_samples=1)
    assert point == REFERENCE


@pytest.mark.parametrize(
    ("space", "point", "message"),
    [
        ("default", {"dropout": 0.1}, "has key 'dropout'"),
        ("default", {"epochs": 3}, "has key 'epochs'"),
        ("report", {**REFERENCE, "class_dim": 7}, "class_dim=7, which is not a choice"),
        ("report", {"class_dim": 5}, "lacks 'content_decay'"),
        ("default", {"class_dim": 0}, "invalid class_dim=0"),
        ("default", {"noise_std": -1.0}, "invalid noise_std=-1.0"),
    ],
)
def test_bad_point_rejected(space, point, message):
    with pytest.raises(ConfigError, match=message):
        check_points([point], resolve(space, BASE), BASE, num_samples=1)


def test_more_points_than_trials_rejected():
    with pytest.raises(ConfigError, match="--num-samples is 1"):
        check_points([REFERENCE, REFERENCE], resolve("report", BASE), BASE, num_samples=1)
