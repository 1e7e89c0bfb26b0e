"""TensorBoard event files of `glo-search train` and of sweep trials, read back with
tensorboard's own event reader."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from optuna.distributions import FloatDistribution
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import summary

from glo_search import cli
from glo_search.config import ConfigError, TrainConfig
from glo_search.metrics import METRICS
from glo_search.probes import CRITERIA
from glo_search.tensorboard import TrainingLog, encode_image
from glo_search.trainer import Trainer

NUM_IMAGES = 200
IMAGE_TAGS = ["grid", *(f"activations_{criterion}" for criterion in CRITERIA)]


def read_events(folder: Path) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        str(folder),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0},
    )
    accumulator.Reload()
    return accumulator


def decode(image_event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)))


def hparams_data(accumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    contents = accumulator.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in contents.items()}


@dataclass
class TrainRun:
    epochs: int
    probe_every: int
    events: event_accumulator.EventAccumulator | None = None


# The 20-epoch run is the full check; the short one keeps the default suite fast.
@pytest.fixture(
    scope="module",
    params=[(6, 4), pytest.param((20, 5), marks=pytest.mark.slow)],
    ids=["6-epochs", "20-epochs"],
)
def run(request, tmp_path_factory, classifier_state) -> TrainRun:
    run = TrainRun(*request.param)
    out = tmp_path_factory.mktemp("train")
    argv = [
        "-q",
        "train",
        "--out",
        str(out),
        "--epochs",
        str(run.epochs),
        "--num-images",
        str(NUM_IMAGES),
        "--swap-sources",
        "20",
        "--probe-every",
        str(run.probe_every),
        "--class-dim",
        "7",
    ]
    assert cli.main(argv) == 0
    run.events = read_events(out / "tensorboard")
    return run


def test_train_scalars_every_epoch(run):
    epochs = list(range(1, run.epochs + 1))
    for name in METRICS:
        assert [event.step for event in run.events.Scalars(f"metrics/{name}")] == epochs, name
    assert [event.step for event in run.events.Scalars("train/loss")] == epochs
    assert [event.step for event in run.events.Scalars("best/disentanglement")] == epochs


def test_train_best_scalar_is_running_best(run):
    values = [event.value for event in run.events.Scalars("metrics/disentanglement")]
    best = [event.value for event in run.events.Scalars("best/disentanglement")]
    assert best == pytest.approx(np.maximum.accumulate(values).tolist())


@pytest.mark.parametrize("name", IMAGE_TAGS)
def test_train_probe_images_every_k_epochs_and_last(run, name):
    steps = [event.step for event in run.events.Images(f"probes/{name}")]
    expected = sorted({*range(run.probe_every, run.epochs + 1, run.probe_every), run.epochs})
    assert steps == expected


def test_train_best_images_at_each_new_best(run):
    values = [event.value for event in run.events.Scalars("metrics/disentanglement")]
    new_best_epochs = [
        epoch
        for epoch, value in enumerate(values, start=1)
        if epoch == 1 or value > max(values[: epoch - 1])
    ]
    for name in IMAGE_TAGS:
        steps = [event.step for event in run.events.Images(f"best/{name}")]
        assert steps == new_best_epochs, name


def test_train_probe_grid_is_84_wide(run):
    grid = decode(run.events.Images("probes/grid")[-1])
    assert grid.shape[1] == 84
    assert grid.shape[0] >= 12 * 28  # 12 probe rows of 28 pixels, plus gaps


def test_train_activation_grid_is_4_by_4(run):
    image = run.events.Images("probes/activations_thick")[-1]
    assert (image.width, image.height) == (4 * 28 + 3 * 2, 4 * 28 + 3 * 2)


def test_train_hparams_hold_config(run):
    start = hparams_data(run.events)["_hparams_/session_start_info"].session_start_info
    assert start.hparams["class_dim"].number_value == 7
    assert start.hparams["num_images"].number_value == NUM_IMAGES
    assert start.hparams["epochs"].number_value == run.epochs
    assert start.hparams["loss"].string_value == "l1+l2"
    assert start.hparams["probe_every"].number_value == run.probe_every


def test_train_hparams_metrics_are_logged_scalars(run):
    experiment = hparams_data(run.events)["_hparams_/experiment"].experiment
    tags = {info.name.tag for info in experiment.metric_infos}
    assert {f"metrics/{name}" for name in METRICS} <= tags
    assert "best/disentanglement" in tags
    assert tags <= set(run.events.Tags()["scalars"])


def test_train_hparams_session_ended(run):
    assert "_hparams_/session_end_info" in hparams_data(run.events)


def test_probe_every_zero_writes_no_images(small_dataset, classifier_state, tmp_path):
    config = TrainConfig(num_images=NUM_IMAGES, swap_sources=20, epochs=1, probe_every=0)
    trainer = Trainer(config, small_dataset, classifier_state, "cpu")
    trainer.train_epoch()
    result = {**trainer.evaluate(), "train_loss": 0.0}
    log = TrainingLog(tmp_path, config)
    log.write_epoch(1, result, trainer)
    log.close()
    events = read_events(tmp_path)
    assert events.Tags()["images"] == []
    assert "metrics/recon_error" in events.Tags()["scalars"]


def test_negative_probe_every_rejected():
    with pytest.raises(ConfigError, match="probe_every=-1"):
        TrainConfig(probe_every=-1)


def probe_sweep(storage, name: str, **options) -> tuple[Path, list]:
    """Run a small sweep over noise_std that writes probe images at every epoch, and
    return its experiment folder and the event files of each trial, in folder order."""
    from glo_search.search import sweep

    grid = sweep(
        {"noise_std": FloatDistribution(0.05, 2.0)},
        base_config={"num_images": NUM_IMAGES, "swap_sources": 20, "probe_every": 1},
        sampler="random",
        storage=storage,
        name=name,
        max_concurrent=2,
        verbose=0,
        **options,
    )
    folder = Path(grid.experiment_path)
    trial_dirs = sorted(folder.glob("trial_*"))
    return folder, [read_events(trial / "tensorboard") for trial in trial_dirs]


@pytest.fixture(scope="module")
def sweep_trials(tmp_path_factory, ray_session):
    from glo_search.search import make_scheduler

    _, logs = probe_sweep(
        tmp_path_factory.mktemp("sweep"),
        "probes",
        num_samples=2,
        max_epochs=1,
        scheduler=make_scheduler("fifo", 1),
    )
    assert len(logs) == 2
    return logs


@pytest.fixture(scope="module")
def stopped_trials(tmp_path_factory, ray_session):
    folder, logs = probe_sweep(
        tmp_path_factory.mktemp("asha"),
        "stopped",
        num_samples=6,
        max_epochs=3,
        grace_period=1,
        reduction_factor=3,
    )
    return pd.read_parquet(folder / "trials.parquet"), logs


def test_stopped_trials_end_their_hparams_session(stopped_trials):
    # ASHA stops trials at rungs. Tune then ends the trial's thread while it copies its files.
    trials, logs = stopped_trials
    assert (trials["status"] == "stopped").any()
    for events in logs:
        assert "_hparams_/session_end_info" in hparams_data(events)


def test_sweep_trials_write_every_kind(sweep_trials):
    for events in sweep_trials:
        tags = events.Tags()
        assert {f"metrics/{name}" for name in METRICS} <= set(tags["scalars"])
        assert {f"probes/{name}" for name in IMAGE_TAGS} <= set(tags["images"])
        assert {f"best/{name}" for name in IMAGE_TAGS} <= set(tags["images"])
        assert "_hparams_/session_start_info" in hparams_data(events)


def test_sweep_trials_end_their_hparams_session(sweep_trials):
    # The scheduler stops each trial at its last epoch's report, so the log must be whole
    # by then.
    for events in sweep_trials:
        assert "_hparams_/session_end_info" in hparams_data(events)


def test_sweep_trials_hparams_differ(sweep_trials):
    noise = [
        hparams_data(events)["_hparams_/session_start_info"]
        .session_start_info.hparams["noise_std"]
        .number_value
        for events in sweep_trials
    ]
    assert noise[0] != noise[1]


def test_sweep_trials_show_same_probes(sweep_trials):
    first, second = (decode(events.Images("probes/grid")[0]) for events in sweep_trials)
    assert first.shape == second.shape
    # Columns 0-55 are the class and content images; 56-83 the trial's own output.
    np.testing.assert_array_equal(first[:, :56], second[:, :56])
    assert not np.array_equal(first[:, 56:], second[:, 56:])


def test_encode_image_keeps_add_image_pixels():
    image = torch.rand(1, 30, 20, generator=torch.Generator().manual_seed(0))
    image[0, 0, :3] = torch.tensor([0.0, 1.0, 0.999])  # both ends and a truncated value
    record = encode_image(image)
    pixels = decode(record)
    # SummaryWriter.add_image's record of the same image, which is RGB.
    reference = decode(summary.image("x", image, dataformats="CHW").value[0].image)
    assert (record.height, record.width, record.colorspace) == (30, 20, 1)
    assert pixels.shape == (30, 20)
    np.testing.assert_array_equal(pixels, reference[..., 0])
    assert pixels[0, :3].tolist() == [0, 255, 254]
