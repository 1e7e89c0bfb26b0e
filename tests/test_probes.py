from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from glo_search import cli
from glo_search.config import TrainConfig
from glo_search.data import Dataset
from glo_search.metrics import style_attributes
from glo_search.probes import (
    CRITERIA,
    MAX_SCALE,
    PROBES_PER_CRITERION,
    ProbeError,
    activation_grid,
    activation_maps,
    checkpoint_file,
    class_representatives,
    dataset_probes,
    probe_images,
    render_rows,
    select_probes,
    write_probe,
)
from glo_search.results import TRIALS_FILE, table_bytes
from glo_search.single import train_run
from glo_search.tensorboard import TrainingLog
from glo_search.trainer import Trainer


def probes_of(probe_set, criterion):
    return [p for p in probe_set.probes if p.criterion == criterion]


@pytest.fixture(scope="module")
def probe_set(small_dataset):
    return select_probes(small_dataset.images, small_dataset.labels, seed=0)


@pytest.fixture(scope="module")
def attributes(small_dataset):
    return style_attributes(small_dataset.images)  # (N, 3): thickness, slant, width


def test_select_probes_counts_per_criterion(probe_set):
    for criterion in CRITERIA:
        assert len(probes_of(probe_set, criterion)) == PROBES_PER_CRITERION, criterion


def test_thick_probes_thicker_than_thin(probe_set, attributes):
    thick = attributes[[p.content_index for p in probes_of(probe_set, "thick")], 0]
    thin = attributes[[p.content_index for p in probes_of(probe_set, "thin")], 0]
    assert thick.min() > thin.max()


def test_thick_probes_are_thickest(probe_set, attributes):
    thick = attributes[[p.content_index for p in probes_of(probe_set, "thick")], 0]
    assert thick.min() >= attributes[:, 0].topk(PROBES_PER_CRITERION).values.min()


def test_slanted_probes_are_most_slanted(probe_set, attributes):
    slant = attributes[[p.content_index for p in probes_of(probe_set, "slanted")], 1].abs()
    assert slant.min() >= attributes[:, 1].abs().topk(PROBES_PER_CRITERION).values.min()


def test_reconstruction_probes_keep_own_class(probe_set, small_dataset):
    for probe in probes_of(probe_set, "reconstruction"):
        assert probe.class_label == int(small_dataset.labels[probe.content_index])


@pytest.mark.parametrize("criterion", ["thick", "thin", "slanted"])
def test_style_probes_swap_to_other_class(probe_set, small_dataset, criterion):
    for probe in probes_of(probe_set, criterion):
        assert probe.class_label != int(small_dataset.labels[probe.content_index])


def test_class_image_shows_target_class(probe_set, small_dataset):
    for probe in probe_set.probes:
        assert int(small_dataset.labels[probe.class_index]) == probe.class_label


def test_class_representative_nearest_class_mean(small_dataset):
    images, labels = small_dataset.images, small_dataset.labels
    representative = class_representatives(images, labels)[3]
    members = (labels == 3).nonzero().flatten()
    mean = images[members].mean(dim=0)
    distances = (images[members] - mean).flatten(1).norm(dim=1)
    assert representative == int(members[distances.argmin()])


def test_probes_depend_on_seed(small_dataset):
    first = select_probes(small_dataset.images, small_dataset.labels, seed=0)
    second = select_probes(small_dataset.images, small_dataset.labels, seed=1)
    assert first != second


def test_probes_same_for_logs_of_one_experiment(small_dataset, classifier_state, tmp_path):
    """Two trials differ in hyperparameters but share images and seed."""
    configs = [
        TrainConfig(num_images=200, swap_sources=20, class_dim=5, noise_std=0.3),
        TrainConfig(num_images=200, swap_sources=20, class_dim=12, generator="adain"),
    ]
    sets = []
    for index, config in enumerate(configs):
        trainer = Trainer(config, small_dataset, classifier_state, "cpu")
        log = TrainingLog(tmp_path / str(index), config)
        log.write_images(trainer, "probes", 1)
        log.close()
        sets.append(log.probe_set)
    assert sets[0] == sets[1]


def test_dataset_probes_follow_the_dataset_object(small_dataset):
    """Kept per dataset object: the same choice as select_probes, and a different
    dataset (here the same digits in reverse order) never gets another's probes."""
    expected = select_probes(small_dataset.images, small_dataset.labels, seed=0)
    assert dataset_probes(small_dataset, 0) == expected
    assert dataset_probes(small_dataset, 0) == expected  # from the cache
    assert dataset_probes(small_dataset, 1) == select_probes(
        small_dataset.images, small_dataset.labels, seed=1
    )
    flipped = Dataset(small_dataset.images.flip(0), small_dataset.labels.flip(0), "flipped")
    assert dataset_probes(flipped, 0) == select_probes(flipped.images, flipped.labels, seed=0)
    assert dataset_probes(flipped, 0) != expected


@pytest.fixture(scope="module")
def trainer(small_dataset, classifier_state):
    config = TrainConfig(num_images=200, swap_sources=20)
    trainer = Trainer(config, small_dataset, classifier_state, "cpu")
    trainer.train_epoch()
    return trainer


def test_rows_are_class_content_output(trainer, probe_set):
    rows = render_rows(trainer, probe_set.probes)
    assert rows.shape == (len(probe_set), 1, 28, 84)
    probe = probe_set.probes[4]
    images = trainer.dataset.images
    torch.testing.assert_close(rows[4, :, :, :28], images[probe.class_index])
    torch.testing.assert_close(rows[4, :, :, 28:56], images[probe.content_index])
    expected = trainer.generate(
        trainer.codes.classes[[probe.class_label]], trainer.codes.content[[probe.content_index]]
    )
    torch.testing.assert_close(rows[4:5, :, :, 56:], expected)


def test_activation_maps_shape(trainer, probe_set):
    assert activation_maps(trainer, probe_set.probes[0]).shape == (16, 14, 14)


def test_activation_grid_scales_to_unit_range():
    maps = torch.arange(16 * 14 * 14, dtype=torch.float32).view(16, 14, 14) - 100
    grid = activation_grid(maps)
    assert grid.shape == (1, 4 * 28 + 3 * 2, 4 * 28 + 3 * 2)
    assert grid.min() == 0.0
    assert grid.max() == 1.0


def test_probe_images_one_activation_grid_per_criterion(trainer, probe_set):
    images = probe_images(trainer, probe_set)
    assert set(images) == {"grid", *(f"activations_{c}" for c in CRITERIA)}
    assert images["grid"].shape[2] == 84


def test_write_probe_rejects_class_label(trainer, tmp_path):
    with pytest.raises(ProbeError, match="class label 10"):
        write_probe(trainer, 10, 0, tmp_path)


@pytest.mark.parametrize("scale", [0, MAX_SCALE + 1])
def test_write_probe_rejects_scale(trainer, tmp_path, scale):
    with pytest.raises(ProbeError, match=f"invalid scale {scale}"):
        write_probe(trainer, 2, 0, tmp_path / "out", scale=scale)
    assert not (tmp_path / "out").exists()


def test_write_probe_rejects_content_index(trainer, tmp_path):
    with pytest.raises(ProbeError, match="content index 200"):
        write_probe(trainer, 2, 200, tmp_path)


@pytest.fixture(scope="module")
def train_out(tmp_path_factory, classifier_state):
    out = tmp_path_factory.mktemp("run")
    train_run(TrainConfig(epochs=1, num_images=200, swap_sources=20, probe_every=0), out)
    return out


@pytest.mark.parametrize("target", ["folder", "best.pt", "last.pt"])
def test_probe_command_writes_pngs(train_out, tmp_path, target, capsys):
    checkpoint = train_out if target == "folder" else train_out / target
    argv = ["probe", str(checkpoint), "--class-label", "2", "--content-index", "123"]
    assert cli.main([*argv, "--out", str(tmp_path), "--scale", "2"]) == 0
    triplet = np.asarray(Image.open(tmp_path / "probe_class2_content123.png"))
    maps = np.asarray(Image.open(tmp_path / "activations_class2_content123.png"))
    assert triplet.shape == (2 * 28, 2 * 84)
    assert maps.shape == (2 * 118, 2 * 118)
    assert "content of image 123" in capsys.readouterr().out


def test_probe_command_content_column_is_training_image(train_out, tmp_path, small_dataset):
    argv = ["probe", str(train_out), "--class-label", "2", "--content-index", "123"]
    assert cli.main([*argv, "--out", str(tmp_path), "--scale", "1"]) == 0
    triplet = np.asarray(Image.open(tmp_path / "probe_class2_content123.png"))
    expected = small_dataset.images[123, 0].mul(255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(triplet[:, 28:56], expected)


def test_probe_command_missing_checkpoint(tmp_path, capsys):
    argv = ["probe", str(tmp_path / "absent"), "--class-label", "2", "--content-index", "1"]
    assert cli.main(argv) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_probe_command_folder_without_checkpoint(tmp_path, capsys):
    argv = ["probe", str(tmp_path), "--class-label", "2", "--content-index", "1"]
    assert cli.main(argv) == 2
    assert "no trainer.pt or best.pt" in capsys.readouterr().err


def test_probe_command_class_label_out_of_range(train_out, capsys):
    argv = ["probe", str(train_out), "--class-label", "-1", "--content-index", "1"]
    assert cli.main(argv) == 2
    assert "invalid class label -1" in capsys.readouterr().err


@pytest.fixture
def sweep_folder(train_out, tmp_path):
    """An experiment folder as a sweep leaves it, with train_out's checkpoint in each trial."""
    folder = tmp_path / "exp"
    rows = []
    for trial, status, best, checkpoint in (
        ("a", "completed", 0.2, "checkpoint_000000"),
        ("b", "stopped", 0.6, "checkpoint_000002"),
        ("c", "diverged", 0.9, "checkpoint_000001"),  # placeholder values, not the best
        ("d", "error", None, None),
    ):
        if checkpoint:
            (folder / f"trial_{trial}" / checkpoint).mkdir(parents=True)
            shutil.copy(
                train_out / "best.pt", folder / f"trial_{trial}" / checkpoint / "trainer.pt"
            )
        path = f"trial_{trial}/{checkpoint}" if checkpoint else None
        rows.append(
            {
                "trial_id": trial,
                "status": status,
                "trial_dir": f"trial_{trial}",
                "best_disentanglement": best,
                "checkpoint_path": path,
            }
        )
    (folder / TRIALS_FILE).write_bytes(table_bytes(rows))
    (folder / "experiment.json").write_text(json.dumps({"metric": "disentanglement"}))
    return folder


def test_checkpoint_of_sweep_folders(sweep_folder):
    best = sweep_folder / "trial_b" / "checkpoint_000002" / "trainer.pt"
    assert checkpoint_file(sweep_folder) == best
    assert checkpoint_file(sweep_folder / "trial_b") == best
    assert checkpoint_file(sweep_folder / "trial_a") == (
        sweep_folder / "trial_a" / "checkpoint_000000" / "trainer.pt"
    )


def test_checkpoint_of_dot_trial_folder(sweep_folder, monkeypatch):
    monkeypatch.chdir(sweep_folder / "trial_a")
    assert checkpoint_file(".").resolve() == (
        sweep_folder / "trial_a" / "checkpoint_000000" / "trainer.pt"
    )


def test_probe_command_on_experiment_folder(sweep_folder, tmp_path, capsys):
    argv = ["probe", str(sweep_folder), "--class-label", "2", "--content-index", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert "trial_b/checkpoint_000002/trainer.pt" in capsys.readouterr().out
    assert (tmp_path / "out" / "probe_class2_content3.png").is_file()


@pytest.mark.parametrize(
    ("trial", "message"),
    [
        ("d", "names no checkpoint for the trial folder"),
        ("e", "is not a trial of"),
    ],
)
def test_checkpoint_of_trial_without_one(sweep_folder, trial, message):
    (sweep_folder / f"trial_{trial}").mkdir(exist_ok=True)
    with pytest.raises(ProbeError, match=message):
        checkpoint_file(sweep_folder / f"trial_{trial}")


def test_checkpoint_of_sweep_that_lost_it(sweep_folder):
    shutil.rmtree(sweep_folder / "trial_b" / "checkpoint_000002")
    with pytest.raises(ProbeError, match="checkpoint_000002, is missing"):
        checkpoint_file(sweep_folder)
