"""`glo-search resume` after the sweep's driver was SIGKILLed, in a moved folder."""

from __future__ import annotations

import json
import os
import shutil
import signal

import optuna
import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState
from processes import BIN, child_env, kill_mentioning, run, short_temp_dir, start, wait_for

from glo_search.results import FINAL_STATUSES, read_experiment
from glo_search.searcher import STUDY_FILE, TUNE_TRIAL_ATTR, sqlite_url

NUM_SAMPLES = 6
MAX_EPOCHS = 4


def _sweep_command(storage) -> list[str]:
    return [
        str(BIN / "glo-search"), "sweep", "--space", "report", "--storage", str(storage),
        "--name", "exp", "--num-samples", str(NUM_SAMPLES), "--max-epochs", str(MAX_EPOCHS),
        "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "2",
        "--num-images", "100", "--swap-sources", "20", "--batch-size", "50", "--seed", "3",
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


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    ray_dir = short_temp_dir("glo-ray-")
    env = child_env(RAY_TMPDIR=str(ray_dir))
    first, moved = tmp_path / "first", tmp_path / "moved"
    folder = first / "exp"
    driver = start(_sweep_command(first), tmp_path / "sweep.log", env)
    try:
        # Kill once a trial has ended in both the results and Tune's saved state, while
        # others are still running: the state a crash of the driver leaves behind.
        def ended():
            done = set(_finished_in_parquet(folder)) & _terminated_in_tune_state(folder)
            return done if len(done) < NUM_SAMPLES else None

        wait_for(ended, 400, "a finished trial")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_mentioning(str(ray_dir))

    before = _finished_in_parquet(folder)
    lines_before = {trial_id: _result_lines(folder, trial_id) for trial_id in before}
    assert 1 <= len(before) < NUM_SAMPLES
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
    for trial_id in trials.trial_id:  # also the trials created after the resume
        assert (folder / f"trial_{trial_id}" / "result.json").is_file(), trial_id
        assert (folder / f"trial_{trial_id}" / "tensorboard").is_dir(), trial_id

    study = optuna.load_study(study_name="exp", storage=sqlite_url(folder / STUDY_FILE))
    by_tune_id = {
        t.user_attrs[TUNE_TRIAL_ATTR]: t
        for t in study.trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }
    assert set(by_tune_id) == set(trials.trial_id)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # Only trials asked but never started before the kill may be FAIL.
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert all(
        TUNE_TRIAL_ATTR not in t.user_attrs
        or t.user_attrs[TUNE_TRIAL_ATTR] not in set(trials.trial_id)
        for t in failed
    )
    expected = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}
    for row in trials.itertuples():
        if row.status in expected:
            assert by_tune_id[row.trial_id].state == expected[row.status], row.trial_id
