"""GloOptunaSearch fed with made-up results, the way Tune calls it."""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import alembic.script
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from glo_search import searcher as searcher_module
from glo_search.search import study_place
from glo_search.searcher import (
    REHEARSAL_STUDY,
    TUNE_TRIAL_ATTR,
    BatchingRDBStorage,
    GloOptunaSearch,
    prepare_empty_study_file,
    rehearse_study,
    share_migration_scripts,
)
from glo_search.storage import locate, sqlite_path, sqlite_url

METRIC = "disentanglement"
MEMORY_URI = "sqlite:///file:memory-study?mode=memory&uri=true"
MAX_EPOCHS = 4
SPACE = {
    "class_dim": CategoricalDistribution([5, 10]),
    "noise_std": FloatDistribution(0.01, 1.0, log=True),
}


def make_searcher(study_dir, points=None) -> GloOptunaSearch:
    return GloOptunaSearch(
        space=SPACE,
        metric=METRIC,
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_url=sqlite_url(study_dir / "optuna.db"),
        study_name="study",
        max_epochs=MAX_EPOCHS,
        points_to_evaluate=points,
    )


def result(epoch: int, value: float, diverged: int = 0) -> dict:
    return {METRIC: value, "epoch": epoch, "training_iteration": epoch, "diverged": diverged}


def run_trial(searcher, trial_id, values, diverged_at=None, error=False):
    """Report one value per epoch; the last one arrives only with the completion."""
    searcher.suggest(trial_id)
    for epoch, value in enumerate(values[:-1], start=1):
        searcher.on_trial_result(trial_id, result(epoch, value))
    last = result(len(values), values[-1], diverged=int(diverged_at is not None))
    searcher.on_trial_complete(trial_id, None if error else last, error=error)


def study_trial(study_dir, tune_id) -> optuna.trial.FrozenTrial:
    study = optuna.load_study(study_name="study", storage=sqlite_url(study_dir / "optuna.db"))
    return next(t for t in study.trials if t.user_attrs[TUNE_TRIAL_ATTR] == tune_id)


def test_searcher_stopped_early_is_pruned(tmp_path):
    searcher = make_searcher(tmp_path)
    run_trial(searcher, "a", [0.1, 0.2])
    trial = study_trial(tmp_path, "a")
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.1, 2: 0.2}
    assert trial.value == 0.2  # Optuna's value of a pruned trial: its last epoch's
    assert trial.user_attrs["stopped_at_epoch"] == 2


def test_searcher_full_run_is_complete(tmp_path):
    searcher = make_searcher(tmp_path)
    run_trial(searcher, "a", [0.1, 0.2, 0.3, 0.25])
    trial = study_trial(tmp_path, "a")
    assert trial.state == TrialState.COMPLETE
    assert trial.value == 0.25
    assert trial.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.25}


def test_searcher_diverged_is_complete_with_worst(tmp_path):
    searcher = make_searcher(tmp_path)
    run_trial(searcher, "a", [0.1, 0.0], diverged_at=2)
    trial = study_trial(tmp_path, "a")
    assert trial.state == TrialState.COMPLETE
    assert trial.value == 0.0
    assert trial.user_attrs["diverged"] is True


def test_searcher_error_is_fail(tmp_path):
    searcher = make_searcher(tmp_path)
    run_trial(searcher, "a", [0.1, 0.2], error=True)
    assert study_trial(tmp_path, "a").state == TrialState.FAIL


def test_searcher_never_stores_nan(tmp_path):
    searcher = make_searcher(tmp_path)
    run_trial(searcher, "a", [0.1, math.nan, 0.2, math.nan])
    trial = study_trial(tmp_path, "a")
    assert trial.state == TrialState.FAIL
    assert trial.intermediate_values == {1: 0.1, 3: 0.2}


def test_searcher_repeated_epoch_keeps_first_value(tmp_path):
    # A trial retried from an earlier checkpoint reports epoch 2 again.
    searcher = make_searcher(tmp_path)
    searcher.suggest("a")
    for epoch, value in [(1, 0.1), (2, 0.2), (2, 0.5), (3, 0.3)]:
        searcher.on_trial_result("a", result(epoch, value))
    searcher.on_trial_complete("a", result(4, 0.4))
    assert study_trial(tmp_path, "a").intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}


def searcher_with_ended_trial(study_dir) -> GloOptunaSearch:
    """Return a searcher whose trial "a" reported epoch 1, then ended in another process."""
    searcher = make_searcher(study_dir)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.1))
    study = optuna.load_study(study_name="study", storage=sqlite_url(study_dir / "optuna.db"))
    study.tell(study_trial(study_dir, "a").number, state=TrialState.PRUNED)
    return searcher


def test_searcher_rerun_of_finished_trial(tmp_path):
    # A driver killed after the study recorded trial "a" as pruned, but before Tune saved
    # its state: the resumed sweep runs "a" again from its checkpoint.
    searcher = searcher_with_ended_trial(tmp_path)
    searcher.on_trial_result("a", result(2, 0.2))
    searcher.on_trial_complete("a", result(4, 0.4))

    trial = study_trial(tmp_path, "a")
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.1}


def test_searcher_completion_of_ended_trial(tmp_path):
    searcher = searcher_with_ended_trial(tmp_path)
    searcher.on_trial_complete("a", result(2, 0.2))

    trial = study_trial(tmp_path, "a")
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.1}
    assert "stopped_at_epoch" not in trial.user_attrs


def stored_params(path: Path) -> list[tuple]:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT param_name FROM trial_params").fetchall()


def test_batch_commits_at_its_end(tmp_path):
    path = tmp_path / "optuna.db"
    storage = BatchingRDBStorage(sqlite_url(path))
    study = optuna.create_study(storage=storage, study_name="study")
    trial = study.ask()
    with storage.batch():
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_categorical("c", ["a", "b"])
        trial.set_user_attr(TUNE_TRIAL_ATTR, "a")
        trial.report(0.5, 1)
        assert stored_params(path) == []
    stored = study.trials[0]
    assert set(stored.params) == {"x", "c"}
    assert stored.user_attrs == {TUNE_TRIAL_ATTR: "a"}
    assert stored.intermediate_values == {1: 0.5}


def test_failed_batch_stores_nothing(tmp_path):
    path = tmp_path / "optuna.db"
    storage = BatchingRDBStorage(sqlite_url(path))
    study = optuna.create_study(storage=storage, study_name="study")
    running, finished = study.ask(), study.ask()
    study.tell(finished, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError), storage.batch():
        storage.set_trial_param(running._trial_id, "x", 0.5, FloatDistribution(0.0, 1.0))
        storage.set_trial_user_attr(finished._trial_id, "late", True)
    assert stored_params(path) == []
    assert study.trials[1].user_attrs == {}


def test_batch_keeps_writes_beside_a_duplicate(tmp_path):
    url = sqlite_url(tmp_path / "optuna.db")
    storage = BatchingRDBStorage(url)
    other_writer = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="study")
    trial_id = study.ask()._trial_id
    x = FloatDistribution(0.0, 1.0)
    with storage.batch():
        storage.set_trial_param(trial_id, "x", 0.5, x)
        storage.set_trial_user_attr(trial_id, TUNE_TRIAL_ATTR, "a")
        other_writer.set_trial_param(trial_id, "x", 0.25, x)
    stored = other_writer.get_trial(trial_id)
    assert stored.params == {"x": 0.25}
    assert stored.user_attrs == {TUNE_TRIAL_ATTR: "a"}


@pytest.mark.parametrize("url", ["sqlite://", MEMORY_URI])
def test_memory_study_commits_each_write(url):
    # Optuna's checks commit through a connection that an in-memory database shares.
    storage = BatchingRDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="study")
    trial_id = study.ask()._trial_id
    with storage.batch():
        storage.set_trial_param(trial_id, "x", 0.5, FloatDistribution(0.0, 1.0))
        assert storage.get_trial(trial_id).params == {"x": 0.5}


def test_searcher_points_come_first(tmp_path):
    point = {"class_dim": 10, "noise_std": 0.5}
    searcher = make_searcher(tmp_path, points=[point])
    assert searcher.suggest("a") == point


def test_searcher_points_not_enqueued_twice(tmp_path):
    point = {"class_dim": 10, "noise_std": 0.5}
    make_searcher(tmp_path, points=[point])
    # A resumed sweep builds the study again from the same searcher settings.
    make_searcher(tmp_path, points=[point])
    study = optuna.load_study(study_name="study", storage=sqlite_url(tmp_path / "optuna.db"))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_searcher_restore_in_moved_folder(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    searcher = make_searcher(old)
    run_trial(searcher, "a", [0.1, 0.2, 0.3, 0.4])
    searcher.suggest("b")
    searcher.on_trial_result("b", result(1, 0.15))
    searcher.save(str(old / "searcher.pkl"))
    shutil.move(old, new)

    restored = make_searcher(new)  # as Tune unpickles it, then restores its state
    restored.relocate(sqlite_url(new / "optuna.db"))
    restored.restore(str(new / "searcher.pkl"))
    restored.on_trial_result("b", result(2, 0.25))
    restored.on_trial_complete("b", result(3, 0.3))

    assert not old.exists()
    trial = study_trial(new, "b")
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.15, 2: 0.25, 3: 0.3}
    assert study_trial(new, "a").state == TrialState.COMPLETE


def test_searcher_restore_fails_orphan_trials(tmp_path):
    searcher = make_searcher(tmp_path)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("b")  # asked after the last save, then the driver died

    restored = make_searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert study_trial(tmp_path, "b").state == TrialState.FAIL
    assert study_trial(tmp_path, "a").state == TrialState.RUNNING


@pytest.mark.parametrize("completion", ["twice", "unknown"])
def test_searcher_ignores_extra_completion(tmp_path, completion):
    searcher = make_searcher(tmp_path)
    run_trial(searcher, "a", [0.1, 0.2, 0.3, 0.4])
    trial_id = "a" if completion == "twice" else "never-suggested"
    searcher.on_trial_complete(trial_id, result(1, 0.9))
    assert study_trial(tmp_path, "a").value == 0.4


def test_searcher_mirrors_study_to_object_store(tmp_path):
    # pyarrow's in-memory filesystem is the object store: SQLite cannot open files there.
    location = locate("mock:///bucket/runs", "exp")
    location.create()
    searcher = make_searcher(tmp_path)
    searcher.relocate(sqlite_url(tmp_path / "optuna.db"), (location, "optuna.db"))
    run_trial(searcher, "a", [0.1, 0.2, 0.3, 0.4])
    assert location.read_bytes("optuna.db") == (tmp_path / "optuna.db").read_bytes()


@pytest.mark.parametrize("folder", ["p%41q", "a?b", "a#b", "a b"])
def test_sqlite_url_keeps_special_folder_names(tmp_path, folder):
    """A study in a folder named with '%', '?' or '#' lands in that folder."""
    path = tmp_path / folder / "optuna.db"
    path.parent.mkdir()
    url = sqlite_url(path)
    assert sqlite_path(url) == path.resolve()
    optuna.create_study(storage=url, study_name="s")
    assert path.is_file()
    assert not (tmp_path / "pAq").exists()


def test_study_place_downloads_mirrored_study(tmp_path):
    location = locate("mock:///bucket/runs", "exp")
    location.create()
    location.write_bytes("optuna.db", b"SQLite format 3\0")
    study_url, mirror = study_place(location)
    assert sqlite_path(study_url).read_bytes() == b"SQLite format 3\0"
    assert mirror == (location, "optuna.db")
    shutil.rmtree(sqlite_path(study_url).parent)


def test_shared_migration_scripts_still_check_the_schema(tmp_path):
    # Every study storage of the process reads Optuna's migration scripts from one loaded
    # copy. New study files get the newest schema, and an older schema is still rejected.
    share_migration_scripts()
    share_migration_scripts()  # a second call keeps the first copy
    (tmp_path / "new").mkdir()
    searcher = make_searcher(tmp_path / "new")
    run_trial(searcher, "a", [0.1, 0.2, 0.3, 0.4])
    assert study_trial(tmp_path / "new", "a").state == TrialState.COMPLETE

    old = tmp_path / "old"
    old.mkdir()
    url = sqlite_url(old / "optuna.db")
    optuna.create_study(study_name="study", storage=url)
    head = optuna.storages.RDBStorage(url)._version_manager.get_head_version()
    scripts = alembic.script.ScriptDirectory(
        str(Path(optuna.storages._rdb.__file__).parent / "alembic")
    )
    previous = scripts.get_revision(head).down_revision
    with sqlite3.connect(old / "optuna.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (previous,))
    with pytest.raises(RuntimeError, match="optuna storage upgrade"):
        optuna.storages.RDBStorage(url)


def test_study_rehearsal_is_silent_and_leaves_logging_alone(tmp_path, monkeypatch, caplog):
    # The sweep rehearses a study in memory while it starts. A user sees nothing of it,
    # and the real study's own log lines still print.
    monkeypatch.setattr(searcher_module, "_rehearsed", False)
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO, logger="optuna"):
            rehearse_study()
            optuna.create_study(study_name="after", storage=sqlite_url(tmp_path / "optuna.db"))
    finally:
        optuna.logging.disable_propagation()
        optuna.logging.set_verbosity(previous)
    assert REHEARSAL_STUDY not in caplog.text
    assert "A new study created in RDB with name: after" in caplog.text


def test_new_study_copies_prepared_file(tmp_path, monkeypatch):
    # A sweep prepares a file with Optuna's tables while it starts, and each new study
    # file is a copy of it. A study file that exists already (a resumed sweep) is kept.
    monkeypatch.setattr(searcher_module, "_empty_study_file", None)
    prepare_empty_study_file()
    # Mark the prepared file, to tell a copy of it from a file that Optuna built.
    marked = tmp_path / "marked.db"
    marked.write_bytes(searcher_module._empty_study_file)
    with closing(sqlite3.connect(marked)) as connection, connection:
        connection.execute("CREATE TABLE prepared_here (x INTEGER)")
    monkeypatch.setattr(searcher_module, "_empty_study_file", marked.read_bytes())

    (tmp_path / "new").mkdir()
    searcher = make_searcher(tmp_path / "new")
    run_trial(searcher, "a", [0.1, 0.2, 0.3, 0.4])
    assert study_trial(tmp_path / "new", "a").state == TrialState.COMPLETE
    with closing(sqlite3.connect(tmp_path / "new" / "optuna.db")) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "prepared_here" in tables

    (tmp_path / "resumed").mkdir()
    searcher = make_searcher(tmp_path / "resumed")
    run_trial(searcher, "b", [0.1, 0.2, 0.3, 0.4])
    make_searcher(tmp_path / "resumed")
    assert study_trial(tmp_path / "resumed", "b").state == TrialState.COMPLETE


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", MEMORY_URI])
def test_memory_study_writes_no_file(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    prepare_empty_study_file()
    assert searcher_module._empty_study_file is not None
    searcher_module._start_study_file(url)
    assert list(tmp_path.iterdir()) == []
