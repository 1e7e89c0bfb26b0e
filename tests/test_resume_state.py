"""What resume rebuilds from an experiment folder: epoch rows, trial statuses, ASHA rungs.

Most tests write the files that a killed sweep leaves behind (the Parquet files and Ray
Tune's result.json) and check the repair. The last ones run a one-trial sweep on the
session's Ray instance and resume it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
from ray import tune
from ray.train import Checkpoint
from ray.train._internal.checkpoint_manager import _CheckpointManager
from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from glo_search import classifier, cli
from glo_search.config import ConfigError
from glo_search.metrics import METRICS
from glo_search.results import (
    EPOCHS_FILE,
    RESULT_FILE,
    TRIALS_FILE,
    ResultsWriter,
    epoch_row,
    table_bytes,
)
from glo_search.resume import _check_classifier, finished, resume
from glo_search.rungs import fill_asha_rungs, resume_epochs
from glo_search.search import EXPERIMENT_FILE, sweep
from glo_search.storage import driver_lock, locate, open_experiment

SMALL = {"num_images": 100, "swap_sources": 20, "batch_size": 50, "eval_every": 1}
TUNE_ENVIRONMENT = (
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S",
)


def _result(trial_id: str, epoch: int, value: float, diverged: int = 0) -> dict:
    """A result as the trainable reports it and Ray's result.json stores it."""
    result = {name: value for name in METRICS}
    result.update({f"nearest_{k}": k for k in range(10)})
    result.update(
        trial_id=trial_id,
        epoch=epoch,
        diverged=diverged,
        train_loss=0.1,
        time_total_s=float(epoch),
        node_id="node",
        training_iteration=epoch,
    )
    return result


def _write(location, relative: str, content: bytes) -> None:
    location.filesystem.create_dir(posixpath.dirname(location.child(relative)), recursive=True)
    location.write_bytes(relative, content)


def _result_file(results: list[dict], cut_line: bool = False) -> bytes:
    lines = [json.dumps(result) for result in results]
    if cut_line:
        lines.append('{"trial_id": "a", "ep')  # the line a kill interrupted
    return ("\n".join(lines) + "\n").encode()


def _location(kind: str, tmp_path):
    # pyarrow's in-memory filesystem plays the object store.
    storage = tmp_path if kind == "local" else "mock:///bucket/runs"
    location = locate(storage, "exp")
    location.create()
    return location


def _writer(location, max_epochs: int = 3) -> ResultsWriter:
    return ResultsWriter(
        location, base={}, metric="disentanglement", mode="max", max_epochs=max_epochs
    )


def _epochs_in_file(location) -> list[tuple[str, int]]:
    rows = pq.read_table(location.open_input_file(EPOCHS_FILE)).to_pylist()
    return sorted((row["trial_id"], row["epoch"]) for row in rows)


@pytest.mark.parametrize("kind", ["local", "object store"])
def test_setup_recovers_rows_from_result_json(kind, tmp_path):
    location = _location(kind, tmp_path)
    running = {"trial_id": "a", "status": "running", "epochs_run": 1}
    location.write_bytes(TRIALS_FILE, table_bytes([running]))
    location.write_bytes(EPOCHS_FILE, table_bytes([epoch_row("a", _result("a", 1, 0.5))]))
    # Epoch 1 of trial a differs from epochs.parquet's row, which must win.
    a_results = [_result("a", 1, 0.9), _result("a", 2, 0.6), _result("a", 3, 0.7)]
    _write(location, f"trial_a/{RESULT_FILE}", _result_file(a_results, cut_line=True))
    _write(location, f"trial_b/{RESULT_FILE}", _result_file([_result("b", 1, 0.4)]))
    _write(location, "trial_c/params.json", b"{}")  # started, never reported

    writer = _writer(location)
    writer.setup()

    assert [row["epoch"] for row in writer.epochs["a"]] == [1, 2, 3]
    assert writer.epochs["a"][0]["disentanglement"] == 0.5
    assert writer.epochs["a"][1]["disentanglement"] == 0.6
    assert [row["epoch"] for row in writer.epochs["b"]] == [1]
    assert "c" not in writer.epochs
    assert writer.trials["a"]["epochs_run"] == 3
    assert writer.trials["a"]["best_disentanglement"] == 0.7
    assert _epochs_in_file(location) == [("a", 1), ("a", 2), ("a", 3), ("b", 1)]


def test_setup_recovery_keeps_newest_report(tmp_path):
    # A trial retried from its epoch-1 checkpoint reported epoch 2 again.
    location = _location("local", tmp_path)
    results = [_result("a", 1, 0.1), _result("a", 2, 0.2), _result("a", 3, 0.3)]
    results.append(_result("a", 2, 0.25))
    _write(location, f"trial_a/{RESULT_FILE}", _result_file(results))

    writer = _writer(location)
    writer.setup()

    assert [row["epoch"] for row in writer.epochs["a"]] == [1, 2]
    assert writer.epochs["a"][1]["disentanglement"] == 0.25


def test_setup_recovery_skips_finished_trials(tmp_path):
    # Tune reran a trial that had ended (its state lagged), and the writer ignored it.
    location = _location("local", tmp_path)
    stopped = {"trial_id": "a", "status": "stopped", "epochs_run": 1}
    location.write_bytes(TRIALS_FILE, table_bytes([stopped]))
    location.write_bytes(EPOCHS_FILE, table_bytes([epoch_row("a", _result("a", 1, 0.5))]))
    results = [_result("a", 1, 0.5), _result("a", 2, 0.6)]
    _write(location, f"trial_a/{RESULT_FILE}", _result_file(results))

    writer = _writer(location)
    writer.setup()

    assert [row["epoch"] for row in writer.epochs["a"]] == [1]
    assert writer.trials["a"] == stopped


def test_setup_without_earlier_files_writes_nothing(tmp_path):
    location = _location("local", tmp_path)
    _writer(location).setup()
    assert not location.has_file(EPOCHS_FILE)
    assert not location.has_file(TRIALS_FILE)


def _trial(location, trial_id: str, status: str) -> Trial:
    """A Ray Tune trial record of the experiment in location, as Tune restores it."""
    storage = StorageContext(storage_path=location.storage_path, experiment_dir_name="exp")
    trial = Trial("train_glo", config={}, trial_id=trial_id, storage=storage, stub=True)
    trial.storage.trial_dir_name = f"trial_{trial_id}"
    trial.set_status(status)
    return trial


@pytest.mark.parametrize(
    ("tune_status", "epochs", "in_trials_file", "started", "expected"),
    [
        (Trial.TERMINATED, [1, 2, 3], True, False, "completed"),
        (Trial.TERMINATED, [1], True, False, "stopped"),
        (Trial.TERMINATED, [1, 2], False, False, "stopped"),
        (Trial.ERROR, [1], True, False, "error"),
        (Trial.RUNNING, [1], True, False, "running"),
        (Trial.PENDING, [1], True, False, "running"),
        # Ctrl-C: Tune marks the trials it cuts off TERMINATED without on_trial_complete.
        (Trial.TERMINATED, [1], True, True, "running"),
    ],
)
def test_experiment_end_settles_restored_trials(
    tune_status, epochs, in_trials_file, started, expected, tmp_path
):
    location = _location("local", tmp_path)
    if in_trials_file:
        running = {"trial_id": "a", "status": "running", "epochs_run": 1}
        location.write_bytes(TRIALS_FILE, table_bytes([running]))
    results = [_result("a", epoch, 0.1 * epoch) for epoch in epochs]
    _write(location, f"trial_a/{RESULT_FILE}", _result_file(results))
    writer = _writer(location, max_epochs=3)
    writer.setup()
    trial = _trial(location, "a", Trial.RUNNING)
    if started:
        writer.on_trial_start(0, [trial], trial)
    trial.set_status(tune_status)

    writer.on_experiment_end(trials=[trial])

    rows = pq.read_table(location.open_input_file(TRIALS_FILE)).to_pylist()
    assert [row["status"] for row in rows] == [expected]
    assert rows[0]["epochs_run"] == epochs[-1]


def test_experiment_end_skips_never_started_trial(tmp_path):
    # Ctrl-C while a trial waits to start: Tune marks it TERMINATED, but it never ran.
    location = _location("local", tmp_path)
    writer = _writer(location)
    writer.setup()
    ran = _trial(location, "a", Trial.RUNNING)
    writer.on_trial_start(0, [ran], ran)
    writer.on_trial_result(0, [ran], ran, _result("a", 1, 0.5))
    ran.set_status(Trial.TERMINATED)
    waiting = _trial(location, "b", Trial.TERMINATED)

    writer.on_experiment_end(trials=[ran, waiting])

    rows = pq.read_table(location.open_input_file(TRIALS_FILE)).to_pylist()
    assert [row["trial_id"] for row in rows] == ["a"]
    assert rows[0]["status"] == "running"


def test_interrupted_trial_names_kept_checkpoint(tmp_path):
    location = _location("local", tmp_path)
    writer = _writer(location)
    writer.setup()
    trial = _trial(location, "a", Trial.RUNNING)
    trial.run_metadata.checkpoint_manager = _CheckpointManager(
        tune.CheckpointConfig(
            num_to_keep=1,
            checkpoint_score_attribute="disentanglement",
            checkpoint_score_order="max",
        )
    )
    writer.on_trial_start(0, [trial], trial)
    for epoch, value in [(1, 0.5), (2, 0.6)]:  # as Tune takes in a result with a checkpoint
        result = _result("a", epoch, value)
        writer.on_trial_result(0, [trial], trial, result)
        folder = tmp_path / "exp" / "trial_a" / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir(parents=True)
        trial.on_checkpoint(_TrainingResult(checkpoint=Checkpoint(str(folder)), metrics=result))
        writer.on_trial_save(0, [trial], trial)
    trial.set_status(Trial.TERMINATED)  # Ctrl-C

    writer.on_experiment_end(trials=[trial])

    rows = pq.read_table(location.open_input_file(TRIALS_FILE)).to_pylist()
    assert rows[0]["checkpoint_path"] == "trial_a/checkpoint_000001"
    assert (tmp_path / "exp" / rows[0]["checkpoint_path"]).is_dir()


def test_experiment_end_keeps_finished_rows(tmp_path):
    location = _location("local", tmp_path)
    stopped = {"trial_id": "a", "status": "stopped", "epochs_run": 1}
    location.write_bytes(TRIALS_FILE, table_bytes([stopped]))
    writer = _writer(location)
    writer.setup()

    writer.on_experiment_end(trials=[_trial(location, "a", Trial.ERROR)])

    rows = pq.read_table(location.open_input_file(TRIALS_FILE)).to_pylist()
    assert rows == [stopped]


def _asha(max_t: int = 4) -> ASHAScheduler:
    # Rungs at epochs 4, 2 and 1, as ASHA orders them.
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=1, reduction_factor=2)


def _rungs(scheduler) -> dict[float, dict[str, float]]:
    (bracket,) = scheduler._brackets
    return {milestone: dict(recorded) for milestone, recorded in bracket._rungs}


def _rows(trial_id: str, values: dict[int, float], diverged: tuple[int, ...] = ()) -> list:
    return [
        epoch_row(trial_id, _result(trial_id, epoch, value, int(epoch in diverged)))
        for epoch, value in values.items()
    ]


def test_fill_asha_rungs_as_asha_records():
    epochs = {
        "done": _rows("done", {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}),
        "stopped": _rows("stopped", {1: 0.3}),
        "diverged": _rows("diverged", {1: 0.4, 2: 1.0}, diverged=(2,)),
        # Evaluated at epochs 1 and 3 only: ASHA records epoch 3 at the rung of epoch 2.
        "sparse": _rows("sparse", {1: 0.2, 3: 0.25}),
        # Tune continues it from its epoch-1 checkpoint and reports epochs 2 and 3 again.
        "resumed": _rows("resumed", {1: 0.9, 2: 0.95, 3: 0.99}),
    }
    last_epochs = {"done": None, "resumed": 1}
    scheduler = _asha()

    filled = fill_asha_rungs(scheduler, epochs, last_epochs, "recon_error", "min")

    # recon_error is minimized, so ASHA stores the negated value.
    assert _rungs(scheduler) == {
        4: {"done": -0.8},
        2: {"done": -0.6, "sparse": -0.25},
        1: {"done": -0.5, "stopped": -0.3, "diverged": -0.4, "sparse": -0.2, "resumed": -0.9},
    }
    assert filled == {4: 1, 2: 2, 1: 5}


def test_filled_rungs_stop_worse_resumed_trial():
    scheduler = _asha()
    epochs = {name: _rows(name, {1: value}) for name, value in [("x", 0.2), ("y", 0.3)]}
    fill_asha_rungs(scheduler, epochs, {}, "recon_error", "min")
    scheduler.set_search_properties("recon_error", "min")
    worse, better = (Trial("train_glo", trial_id=name, stub=True) for name in ("w", "b"))
    for trial in (worse, better):
        scheduler.on_trial_add(None, trial)

    assert scheduler.on_trial_result(None, worse, {"epoch": 1, "recon_error": 0.4}) == (
        TrialScheduler.STOP
    )
    assert scheduler.on_trial_result(None, better, {"epoch": 1, "recon_error": 0.1}) == (
        TrialScheduler.CONTINUE
    )


def test_resume_epochs_follow_tune_status(tmp_path):
    location = _location("local", tmp_path)
    ended = [
        _trial(location, name, status)
        for name, status in [("t", Trial.TERMINATED), ("e", Trial.ERROR)]
    ]
    fresh = _trial(location, "p", Trial.PENDING)
    continued = _trial(location, "r", Trial.RUNNING)
    checkpoint_dir = tmp_path / "exp" / "trial_r" / "checkpoint_000001"
    checkpoint_dir.mkdir(parents=True)
    result = _TrainingResult(checkpoint=Checkpoint(str(checkpoint_dir)), metrics={"epoch": 2})
    continued.run_metadata.checkpoint_manager.register_checkpoint(result)

    assert resume_epochs([*ended, fresh, continued]) == {"t": None, "e": None, "p": 0, "r": 2}


def _classifier_settings(**changes) -> dict:
    recorded = json.loads(json.dumps(asdict(classifier.load_info())))
    return {"classifier": {**recorded, **changes}}


@pytest.mark.parametrize(
    ("changes", "warned"),
    [
        ({}, False),
        ({"weights": "/elsewhere/digit-classifier-v1.pt"}, False),
        ({"held_out_accuracy": 0.5}, True),
        ({"version": 0}, True),
        ({"train_indices": [0, 10]}, True),
        ({"held_out_indices": [0, 10]}, True),
    ],
)
def test_classifier_check_ignores_weights_path(changes, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="glo_search.resume"):
        _check_classifier(_classifier_settings(**changes))
    warnings = [r.getMessage() for r in caplog.records if "classifier differs" in r.getMessage()]
    assert bool(warnings) == warned
    for key in changes if warned else ():
        assert key in warnings[0]


SPACE_FILE = """\
from ray import tune

SPACE = {"class_dim": tune.choice([4, 6])}
"""


@pytest.fixture(scope="module")
def space_file_sweep(ray_session, tmp_path_factory):
    """A one-trial, one-epoch sweep started with a relative --space file path."""
    root = tmp_path_factory.mktemp("relative-space")
    work = root / "work"
    work.mkdir()
    (work / "space.py").write_text(SPACE_FILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        sweep(
            "space.py",
            num_samples=1,
            max_epochs=1,
            base_config=SMALL,
            storage=root / "runs",
            name="exp",
            verbose=0,
        )
    return work, root / "runs" / "exp"


def test_space_file_recorded_absolute(space_file_sweep):
    work, folder = space_file_sweep
    settings = json.loads((folder / EXPERIMENT_FILE).read_text())
    assert settings["space_source"] == str(work / "space.py")


def test_resume_from_other_folder(space_file_sweep, tmp_path, monkeypatch):
    _, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    monkeypatch.chdir(tmp_path)

    grid = resume(copy)

    assert len(grid) == 1
    assert not grid.errors


@pytest.mark.parametrize("verbose", [0, 1])
def test_resume_verbosity(space_file_sweep, tmp_path, monkeypatch, capsys, verbose):
    work, folder = space_file_sweep  # swept with verbose=0
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    monkeypatch.chdir(work)

    resume(copy, verbose=verbose)

    output = capsys.readouterr().out
    assert ("TERMINATED" in output) == bool(verbose)  # Tune's table of trial statuses
    assert ("Configuration for experiment" in output) == bool(verbose)  # and its settings
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ  # set for the run only


def test_resume_sets_tune_environment(space_file_sweep, tmp_path, monkeypatch):
    work, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    monkeypatch.chdir(work)
    for name in TUNE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)

    resume(copy)

    # The Tune settings of a sweep apply to the resumed part too.
    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"


def _set_status(folder, status: str) -> None:
    rows = pq.read_table(folder / TRIALS_FILE).to_pylist()
    for row in rows:
        row["status"] = status
    (folder / TRIALS_FILE).write_bytes(table_bytes(rows))


def _set_num_samples(folder, num_samples: int) -> None:
    settings = json.loads((folder / EXPERIMENT_FILE).read_text())
    settings["num_samples"] = num_samples
    (folder / EXPERIMENT_FILE).write_text(json.dumps(settings))


@pytest.mark.parametrize(
    ("num_samples", "status", "finished_count", "exit_status"),
    [(1, None, 1, 0), (3, None, 1, 130), (1, "running", 0, 130), (1, "error", 1, 1)],
)
def test_summary_marks_interrupted_sweep(
    space_file_sweep, tmp_path, capsys, num_samples, status, finished_count, exit_status
):
    _, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    _set_num_samples(copy, num_samples)
    if status is not None:
        _set_status(copy, status)

    assert cli._print_summary(open_experiment(copy), "disentanglement") == exit_status
    # A sweep that the summary does not call interrupted has nothing left to resume.
    assert finished(copy) == (exit_status in (0, 1))

    output = capsys.readouterr().out
    assert "best 1 of 1 trials" in output
    if exit_status in (0, 1):  # 1: every trial failed
        assert "sweep interrupted" not in output
        assert "partial results" not in output
        return
    assert "partial results" in output
    last_line = output.strip().splitlines()[-1]
    assert last_line == (
        f"sweep interrupted: {finished_count} of {num_samples} trials finished; "
        f"continue with: glo-search resume {copy}"
    )


def test_resume_cli_finished_sweep(space_file_sweep, tmp_path, capsys):
    _, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    before = {path.name: path.stat().st_mtime_ns for path in copy.iterdir()}

    assert cli.main(["resume", str(copy)]) == 0

    output = capsys.readouterr().out
    assert output.startswith(f"every trial of the sweep in {copy} had finished; nothing to resume")
    assert "best 1 of 1 trials" in output
    # Ray Tune did not run: it would have rewritten its saved state.
    assert {path.name: path.stat().st_mtime_ns for path in copy.iterdir()} == before


def _set_tune_status(folder, status: str) -> None:
    """Set every trial's status in Tune's newest saved state, as a stop before its save."""
    path = max(folder.glob("experiment_state-*.json"))
    state = json.loads(path.read_text())
    for entry in state["trial_data"]:
        fields = json.loads(entry[0])
        fields["status"] = status
        entry[0] = json.dumps(fields)
    path.write_text(json.dumps(state))


def test_resume_keeps_late_ended_trial(space_file_sweep, tmp_path, caplog):
    _, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    # The driver stopped after the trial ended and its row was written, before Tune
    # saved its state again.
    _set_tune_status(copy, "RUNNING")
    (trial_dir,) = copy.glob("trial_*")
    results_before = (trial_dir / "result.json").read_text()
    row_before = pq.read_table(copy / TRIALS_FILE).to_pylist()

    with caplog.at_level(logging.INFO, logger="glo_search"):
        grid = resume(copy, verbose=0)

    assert [result.metrics["epoch"] for result in grid] == [1]
    assert "Tune runs it again" not in caplog.text
    assert "kept as ended" in caplog.text
    assert (trial_dir / "result.json").read_text() == results_before
    assert pq.read_table(copy / TRIALS_FILE).to_pylist() == row_before


def test_resume_rejected_while_locked(space_file_sweep, tmp_path):
    _, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    _set_status(copy, "running")
    state_before = {path.name: path.read_bytes() for path in copy.glob("experiment_state-*")}

    with driver_lock(open_experiment(copy)):  # the lock a running sweep's driver has
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}\\) is running the sweep in"):
            resume(copy, verbose=0)
        assert cli.main(["resume", str(copy)]) == 2

    assert {path.name: path.read_bytes() for path in copy.glob("experiment_state-*")} == (
        state_before
    )
    resume(copy, verbose=0)  # the lock ends with its holder


@pytest.mark.parametrize("pattern", ["search_gen_state-*.json", "searcher-state-*.pkl"])
@pytest.mark.parametrize("cut", ["empty", "half"])
def test_resume_rejects_damaged_state(space_file_sweep, tmp_path, pattern, cut):
    _, folder = space_file_sweep
    copy = tmp_path / "exp"
    shutil.copytree(folder, copy)
    damaged = max(copy.glob(pattern))
    content = damaged.read_bytes()
    damaged.write_bytes(b"" if cut == "empty" else content[: len(content) // 2])
    before = {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()}

    with pytest.raises(ConfigError, match=f"saved state {damaged.name} is damaged"):
        resume(copy, verbose=0)

    # Nothing ran: Tune would otherwise start afresh and write a state without the trials.
    assert {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()} == before
