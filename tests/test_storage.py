"""Experiment folders on local paths and pyarrow filesystems."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from glo_search.config import ConfigError
from glo_search.results import EPOCHS_FILE, TRIALS_FILE, ResultsWriter, table_bytes
from glo_search.storage import LOCK_FILE, driver_lock, locate, open_experiment


def test_locate_local_path_and_file_uri_agree(tmp_path):
    plain = locate(tmp_path, "exp")
    uri = locate(f"file://{tmp_path}", "exp")
    assert plain.path == uri.path == str(tmp_path / "exp")
    assert plain.is_local and uri.is_local
    assert uri.uri == str(tmp_path / "exp")


def test_relative_storage_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locate("runs", "exp").local_dir == tmp_path / "runs" / "exp"


def test_object_store_location_round_trip():
    # pyarrow's in-memory filesystem plays the object store: not local, and no rename.
    location = locate("mock:///bucket/runs", "exp")
    assert not location.is_local
    assert location.storage_path == "bucket/runs"
    location.create()
    location.write_bytes("experiment.json", b"{}")
    assert location.has_file("experiment.json")
    assert location.read_bytes("experiment.json") == b"{}"
    location.remove()
    assert not location.exists()


def test_results_reload_from_object_store():
    location = locate("mock:///bucket/runs", "exp")
    location.create()
    trial = {"trial_id": "a", "status": "completed"}
    epoch = {"trial_id": "a", "epoch": 1, "disentanglement": 0.5}
    location.write_bytes(TRIALS_FILE, table_bytes([trial]))
    location.write_bytes(EPOCHS_FILE, table_bytes([epoch]))

    writer = ResultsWriter(location, base={}, metric="disentanglement", mode="max", max_epochs=2)
    writer.setup()
    assert writer.trials == {"a": trial}
    assert writer.epochs == {"a": [epoch]}


def test_create_in_file_rejected(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(ConfigError, match="choose a writable --storage"):
        locate(tmp_path / "file.txt", "exp").create()


def test_create_leaves_only_the_folder(tmp_path):
    location = locate(tmp_path, "exp")
    location.create()
    assert list((tmp_path / "exp").iterdir()) == []


def test_open_experiment_filesystem_of_uri(tmp_path):
    assert isinstance(open_experiment(f"file://{tmp_path}").filesystem, pafs.LocalFileSystem)


def test_lock_held_once_and_released(tmp_path):
    location = open_experiment(tmp_path)
    with driver_lock(location):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with driver_lock(location):
                pass
    with driver_lock(location):  # released when the holder left
        pass


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_lock_file_that_is_not_a_file(tmp_path, kind):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    folder = tmp_path / "exp"
    folder.mkdir()
    if kind == "symlink":
        (folder / LOCK_FILE).symlink_to(target)
    else:
        (folder / LOCK_FILE).mkdir()
    message = "symbolic link" if kind == "symlink" else "it is a folder"
    with pytest.raises(ConfigError, match=message):
        with driver_lock(open_experiment(folder)):
            pass
    assert target.read_text() == "keep me"
