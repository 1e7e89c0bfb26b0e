"""`glo-search resume` after a sweep's driver was SIGKILLed or interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal

import optuna
import pyarrow.parquet as pq
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from processes import (
    BIN,
    child_env,
    kill_mentioning,
    run,
    short_temp_dir,
    start,
    stop_group,
    wait_for,
)
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from glo_search import rungs
from glo_search.results import FINAL_STATUSES, read_experiment
from glo_search.resume import resume
from glo_search.search import sweep
from glo_search.searcher import STUDY_FILE, TUNE_TRIAL_ATTR
from glo_search.storage import open_experiment, sqlite_url

NUM_SAMPLES = 6
# ASHA's rungs are at epochs 1, 2 and 4 (grace period 1, reduction factor 2). Two more
# epochs follow the last rung, so a trial that passes it reports results that are not
# its last, and the other slot's trial may have ended by then.
MAX_EPOCHS = 6


def _sweep_command(storage) -> list[str]:
    return [
        str(BIN / "glo-search"), "sweep", "--space", "report", "--storage", str(storage),
        "--name", "exp", "--num-samples", str(NUM_SAMPLES), "--max-epochs", str(MAX_EPOCHS),
        "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "2",
        # With 2,000 images an epoch takes about a second on a 2-core VM (an estimate), so
        # a running trial's results stay unflushed long enough for the test to catch
        # them. With 100 images the whole sweep ended first, and with 1,000 the test
        # missed that state in some runs.
        "--num-images", "2000", "--swap-sources", "20", "--batch-size", "50", "--seed", "3",
        "--eval-every", "1",
        # A new worker per trial slows the trials, so the tests can catch the sweep
        # between two trials. With reused workers all 6 can end before the first check.
        "--no-reuse-workers",
    ]  # fmt: skip


def _finished_in_parquet(folder) -> dict[str, dict]:
    path = folder / "trials.parquet"
    if not path.is_file():
        return {}
    rows = pq.read_table(path).to_pylist()
    return {row["trial_id"]: row for row in rows if row["status"] in FINAL_STATUSES}


def _terminated_in_tune_state(folder) -> set[str]:
    """Trials that Tune's newest saved state records as finished."""
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        saved = json.loads(states[-1].read_text())
    except json.JSONDecodeError:
        return set()  # caught mid-write
    trials = [json.loads(entry[0]) for entry in saved["trial_data"]]
    return {t["trial_id"] for t in trials if t["status"] in ("TERMINATED", "ERROR")}


def _result_lines(folder, trial_id) -> list[str]:
    return (folder / f"trial_{trial_id}" / "result.json").read_text().splitlines()


def _unflushed_epochs(folder) -> set[tuple[str, int]]:
    """(trial_id, epoch) of results in the folder's result.json files but not in epochs.parquet."""
    path = folder / "epochs.parquet"
    flushed = set()
    if path.is_file():
        flushed = {(row["trial_id"], row["epoch"]) for row in pq.read_table(path).to_pylist()}
    reported = set()
    for result_file in folder.glob("trial_*/result.json"):
        for line in result_file.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue  # caught mid-write
            reported.add((result["trial_id"], result["epoch"]))
    return reported - flushed


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    ray_dir = short_temp_dir("glo-ray-")
    env = child_env(RAY_TMPDIR=str(ray_dir))
    first, moved = tmp_path / "first", tmp_path / "moved"
    folder = first / "exp"
    # Tune (Ray 2.60) saves its state every 10 s or more by default, and sooner only
    # after a trial checkpoint, which can come before the trial's end is recorded. Two
    # trials that end within a few seconds of each other then never show the state this
    # test waits for: one trial ended in Tune's saved state while the other still runs.
    # A 1 s period leaves that state open for most of the running trial's last epochs.
    sweep_env = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = start(_sweep_command(first), tmp_path / "sweep.log", sweep_env)
    try:
        # Kill once a trial has ended in both the results and Tune's saved state, while
        # another is running with results that epochs.parquet does not have yet: the
        # state a crash of the driver leaves behind.
        def ended():
            if driver.poll() is not None:
                raise AssertionError(
                    "the sweep ended before the test saw a finished trial and unflushed "
                    "results of a running one; see " + str(tmp_path / "sweep.log")
                )
            done = set(_finished_in_parquet(folder)) & _terminated_in_tune_state(folder)
            if not 1 <= len(done) < NUM_SAMPLES:
                return None
            return {trial_id for trial_id, _ in _unflushed_epochs(folder)} - done

        wait_for(
            ended, 400, "a finished trial and unflushed results of a running one", interval_s=0.1
        )
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_mentioning(str(ray_dir))

    before = _finished_in_parquet(folder)
    lines_before = {trial_id: _result_lines(folder, trial_id) for trial_id in before}
    unflushed = _unflushed_epochs(folder)
    assert 1 <= len(before) < NUM_SAMPLES
    assert unflushed
    shutil.move(first, moved)
    folder = moved / "exp"

    try:
        log = tmp_path / "resume.log"
        resume = [str(BIN / "glo-search"), "resume", str(folder)]
        assert run(resume, log, env, timeout=500) == 0, log.read_text()[-3000:]
    finally:
        kill_mentioning(str(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)

    trials, epochs = read_experiment(folder)
    assert not first.exists(), "resume wrote to the folder's old place"
    # The total is the number asked, every trial ended, and earlier results are kept.
    assert len(trials) == NUM_SAMPLES
    assert trials.trial_id.is_unique
    assert set(trials.status) <= FINAL_STATUSES
    for trial_id, row in before.items():
        now = trials.set_index("trial_id").loc[trial_id]
        assert now.status == row["status"]
        assert now.epochs_run == row["epochs_run"]
        # Tune logged no new result for it: the trial did not run again.
        assert _result_lines(folder, trial_id) == lines_before[trial_id]
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    # Results reported before the kill but not yet in epochs.parquet were recovered.
    assert unflushed <= set(zip(epochs.trial_id, epochs.epoch, strict=True))
    for row in trials.itertuples():  # every trial evaluates every epoch
        reported = sorted(epochs[epochs.trial_id == row.trial_id].epoch)
        assert reported == list(range(1, row.epochs_run + 1)), row.trial_id
    for trial_id in trials.trial_id:  # also the trials created after the resume
        trial_dir = folder / f"trial_{trial_id}"
        assert (trial_dir / "result.json").is_file(), trial_id
        assert (trial_dir / "tensorboard").is_dir(), trial_id
        # Only the trainable's own TensorBoard files, not Ray's, also after the resume.
        assert not list(trial_dir.glob("events.out.tfevents*")), trial_id
    assert "refilled the ASHA rungs" in log.read_text()

    # NOTE: Ray Tune (2.60) deletes a trial's older checkpoint before it saves the state
    # that stops naming it. A kill in between leaves that trial unable to continue, and it
    # ends as an error. No trial may end as an error for any other reason.
    lost = set(trials.trial_id[trials.status == "error"])
    for trial_id in lost:
        error = (folder / f"trial_{trial_id}" / "error.txt").read_text()
        assert "does not exist on storage anymore" in error, trial_id

    study = optuna.load_study(study_name="exp", storage=sqlite_url(folder / STUDY_FILE))
    by_tune_id = {
        t.user_attrs[TUNE_TRIAL_ATTR]: t
        for t in study.trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }
    assert set(by_tune_id) == set(trials.trial_id) - lost
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # Only the lost trials and trials asked but never started before the kill may be FAIL.
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert all(
        TUNE_TRIAL_ATTR not in t.user_attrs
        or t.user_attrs[TUNE_TRIAL_ATTR] not in set(trials.trial_id) - lost
        for t in failed
    )
    expected = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}
    for row in trials.itertuples():
        if row.status in expected:
            assert by_tune_id[row.trial_id].state == expected[row.status], row.trial_id


SPACE_FILE = """\
from ray import tune

SPACE = {"class_dim": tune.choice([4, 6])}
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_exit_status(tmp_path, stop):
    ray_dir = short_temp_dir("glo-ray-")
    env = child_env(RAY_TMPDIR=str(ray_dir))
    work = tmp_path / "work"
    work.mkdir()
    (work / "space.py").write_text(SPACE_FILE)
    folder = work / "runs" / "exp"
    # A relative --space path, resumed below from another working directory.
    sweep_command = [
        str(BIN / "glo-search"), "sweep", "--space", "space.py", "--storage", "runs",
        "--name", "exp", "--num-samples", "3", "--max-epochs", "3", "--max-concurrent", "1",
        "--num-images", "100", "--swap-sources", "20", "--batch-size", "50", "--eval-every", "1",
        "--no-reuse-workers",  # slower trials: the interrupt comes before the sweep ends
    ]  # fmt: skip
    sweep_log, resume_log = tmp_path / "sweep.log", tmp_path / "resume.log"
    try:
        driver = start(sweep_command, sweep_log, env, cwd=work)
        try:
            # Interrupt as Ctrl-C (or a job scheduler's SIGTERM) does once the first trial
            # has reported a result.
            wait_for(lambda: list(folder.glob("trial_*/result.json")), 300, "a first result")
            os.kill(driver.pid, stop)
            status = driver.wait(timeout=120)
        finally:
            stop_group(driver)
        output = sweep_log.read_text()
        assert status == 130, output[-3000:]
        assert "partial results" in output
        assert "sweep interrupted: " in output
        assert f"of 3 trials finished; continue with: glo-search resume {folder}" in output
        assert "Tuner.restore" not in output  # Tune's own hint would skip glo-search's resume

        resume = [str(BIN / "glo-search"), "resume", str(folder)]
        assert run(resume, resume_log, env, timeout=400) == 0, resume_log.read_text()[-3000:]
    finally:
        kill_mentioning(str(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)

    assert "sweep interrupted" not in resume_log.read_text()
    trials, _ = read_experiment(folder)
    assert len(trials) == 3
    assert set(trials.status) <= FINAL_STATUSES


# Three trials that learn and one whose learning rates are too small to change its
# recon_error in one epoch (measured with seed 0 and batches of 10 images: 0.32 against
# 0.25 to 0.30).
GOOD = [{"lr_generator": lr, "lr_latent": 1e-2} for lr in (1e-3, 2e-3, 3e-3)]
BAD = {"lr_generator": 1e-7, "lr_latent": 1e-7}


class InterruptAtBadTrial(tune.Callback):
    """Interrupt the sweep, as Ctrl-C does, when the BAD trial starts, and only once."""

    def __init__(self, marker):
        self.marker = marker

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.config.get("lr_generator") != BAD["lr_generator"] or self.marker.exists():
            return
        self.marker.touch()
        signal.raise_signal(signal.SIGUSR1)  # Tune ends a run on SIGUSR1 as on SIGINT


def _asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2)


def _rungs(scheduler) -> dict[float, dict[str, float]]:
    return {m: dict(recorded) for b in scheduler._brackets for m, recorded in b._rungs}


@pytest.mark.slow
def test_resumed_asha_stops_worse_trial(ray_session, tmp_path):
    space = {
        "lr_generator": CategoricalDistribution([1e-3, 2e-3, 3e-3, BAD["lr_generator"]]),
        "lr_latent": CategoricalDistribution([1e-2, BAD["lr_latent"]]),
    }
    scheduler = _asha()
    sweep(
        space,
        metric="recon_error",
        num_samples=4,
        max_epochs=3,
        base_config={"num_images": 100, "swap_sources": 20, "batch_size": 10, "eval_every": 1},
        scheduler=scheduler,
        storage=tmp_path,
        name="exp",
        max_concurrent=1,
        points=[*GOOD, BAD],
        callbacks=[InterruptAtBadTrial(tmp_path / "interrupted")],
        verbose=0,
    )
    folder = tmp_path / "exp"
    trials, _ = read_experiment(folder)
    bad = trials[trials.lr_generator == BAD["lr_generator"]].trial_id.item()
    assert (trials.status == "running").sum() == 1
    assert trials.set_index("trial_id").loc[bad, "status"] == "running"

    # The refill reproduces the rungs that ASHA had built before the interruption.
    refilled = _asha()
    saved_trials = tune.ExperimentAnalysis(str(folder)).trials
    rungs.refill(refilled, open_experiment(folder), saved_trials, "recon_error", "min")
    assert _rungs(refilled) == _rungs(scheduler)
    assert len(_rungs(refilled)[1]) == 3

    resume(folder)

    trials, _ = read_experiment(folder)
    row = trials.set_index("trial_id").loc[bad]
    # Without the refill the rungs would be empty and the BAD trial would run to epoch 3.
    assert row.status == "stopped"
    assert row.epochs_run == 1
