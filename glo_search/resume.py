"""Continue an interrupted sweep from its experiment folder with Ray Tune's Tuner.restore.

Trials that finished (completed, stopped early, diverged or errored) are kept as they are.
Trials that were running or waiting continue from their latest checkpoint, and the
searcher continues from its saved state, so the Optuna study keeps its history and the
sweep ends with the number of trials it was started with.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import pickle
import pickletools
import posixpath
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray import tune

from glo_search import classifier, rungs
from glo_search.config import ConfigError, from_dict
from glo_search.results import EPOCHS_FILE, FINAL_STATUSES, TRIALS_FILE, ResultsWriter
from glo_search.searcher import GloOptunaSearch, RelocatableSearchGenerator, base_searcher
from glo_search.spaces import resolve
from glo_search.storage import ExperimentLocation, driver_lock, open_experiment

logger = logging.getLogger(__name__)

TUNER_FILE = "tuner.pkl"


def read_settings(location: ExperimentLocation) -> dict[str, Any]:
    """Read the settings a sweep was started with (experiment.json)."""
    from glo_search.search import EXPERIMENT_FILE

    if not location.exists():
        raise ConfigError(f"experiment folder not found: {location.uri}")
    if not location.has_file(EXPERIMENT_FILE):
        raise ConfigError(
            f"{location.uri} is not a glo-search experiment folder: it has no "
            f"{EXPERIMENT_FILE}; give the folder that `glo-search sweep` printed"
        )
    try:
        settings = json.loads(location.read_bytes(EXPERIMENT_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"invalid JSON in {location.uri}/{EXPERIMENT_FILE}: {error}") from None
    if not isinstance(settings, dict):
        settings = {}
    missing = [key for key in REQUIRED_SETTINGS if key not in settings]
    if missing:
        raise ConfigError(
            f"invalid {location.uri}/{EXPERIMENT_FILE}: missing {', '.join(missing)}; "
            "the sweep wrote this file at its start, so restore it from a copy"
        )
    return settings


# Keys of experiment.json that resume reads.
REQUIRED_SETTINGS = (
    "base_config",
    "metric",
    "mode",
    "num_samples",
    "max_epochs",
    "cpus_per_trial",
    "gpus_per_trial",
)


def _check_result_tables(location: ExperimentLocation) -> None:
    """Check that trials.parquet and epochs.parquet, where present, can be read."""
    for name in (TRIALS_FILE, EPOCHS_FILE):
        if not location.has_file(name):
            continue
        try:
            pq.read_metadata(location.open_input_file(name))
        except (pa.ArrowInvalid, OSError) as error:
            raise ConfigError(
                f"cannot resume {location.uri}: {name} is damaged ({error}); restore it "
                "from a copy"
            ) from None


def finished(experiment: str | Path | ExperimentLocation) -> bool:
    """Return whether every trial the sweep requested has a final status (nothing to resume).

    Reads experiment.json and trials.parquet only, without starting Ray. Raises
    ConfigError, as resume does, for a folder that is not an experiment or whose tables
    are damaged.
    """
    location = experiment
    if not isinstance(location, ExperimentLocation):
        location = open_experiment(experiment)
    settings = read_settings(location)
    _check_result_tables(location)
    statuses = _table_statuses(location).values()
    return len(statuses) >= settings["num_samples"] and all(
        status in FINAL_STATUSES for status in statuses
    )


def _table_statuses(location: ExperimentLocation) -> dict[str, str]:
    if not location.has_file(TRIALS_FILE):
        return {}
    table = pq.read_table(location.open_input_file(TRIALS_FILE), columns=["trial_id", "status"])
    return {row["trial_id"]: row["status"] for row in table.to_pylist()}


def _settle_finished_trials(location: ExperimentLocation) -> list[str]:
    """Mark the trials that trials.parquet records as ended as ended in Tune's saved state.

    Tune saves its state after trial checkpoints, not when a trial ends. A driver stopped
    just after a trial ended leaves that trial unfinished in the state, and
    Tuner.restore would run it again from its latest checkpoint, past the epoch where
    ASHA stopped it. trials.parquet and the Optuna study would keep the first run, and
    its checkpoint path would name a checkpoint that the rerun deletes.

    Returns the ids of the trials changed in the newest experiment_state file.
    """
    statuses = _table_statuses(location)
    ended = {trial_id for trial_id, status in statuses.items() if status in FINAL_STATUSES}
    if not ended:
        return []
    # NOTE: Ray 2.60's experiment_state file: JSON whose "trial_data" lists, per trial,
    # [JSON text of the trial's fields, JSON text of its run metadata].
    name = _newest_state_file(location, "experiment_state-*.json")
    state = json.loads(location.read_bytes(name))
    settled = []
    for entry in state["trial_data"]:
        fields = json.loads(entry[0])
        trial_id = fields["trial_id"]
        if trial_id not in ended or fields["status"] in ("TERMINATED", "ERROR"):
            continue
        fields["status"] = "ERROR" if statuses[trial_id] == "error" else "TERMINATED"
        entry[0] = json.dumps(fields, indent=2)
        settled.append(trial_id)
    if settled:
        location.write_bytes(name, json.dumps(state).encode())
    return settled


# The files from which Tuner.restore (Ray 2.60) rebuilds the run, the search algorithm
# and the searcher, with the format of each. Tune reads the newest of each, by name. The
# search algorithm's state is a cloudpickle despite its .json name.
SAVED_STATE_FORMATS = {
    "experiment_state-*.json": "json",
    "search_gen_state-*.json": "pickle",
    "searcher-state-*.pkl": "pickle",
}


def _newest_state_file(location: ExperimentLocation, pattern: str) -> str | None:
    """Return the name of the newest file matching pattern, as Tune picks it: the last by name."""
    listing = location.filesystem.get_file_info(pafs.FileSelector(location.path))
    matching = fnmatch.filter([posixpath.basename(info.path) for info in listing], pattern)
    return max(matching) if matching else None


def _check_saved_state(location: ExperimentLocation) -> None:
    """Raise ConfigError when a file that Tune restores from is empty or cut short.

    A driver killed while Tune copied its state into the folder can leave such a file.
    Tune then logs "Failed to restore the run state" and starts the sweep afresh in the
    same folder, which writes a state without the earlier trials: the sweep never ends.
    Pickles are checked opcode by opcode, without running them.
    """
    for pattern, kind in SAVED_STATE_FORMATS.items():
        name = _newest_state_file(location, pattern)
        if name is None:
            continue
        content = location.read_bytes(name)
        try:
            # Both raise ValueError for an empty file too.
            if kind == "json":
                json.loads(content)
            else:
                for _ in pickletools.genops(io.BytesIO(content)):
                    pass
        except ValueError as error:
            raise ConfigError(
                f"cannot resume {location.uri}: Ray Tune's saved state {name} is damaged "
                f"({error}); the driver was probably stopped while writing it. Restore the "
                "folder from a copy, or start the sweep again"
            ) from None


def _check_tune_state(location: ExperimentLocation) -> None:
    has_state = _newest_state_file(location, "experiment_state-*.json") is not None
    if not location.has_file(TUNER_FILE) or not has_state:
        raise ConfigError(
            f"{location.uri} has no saved Ray Tune state ({TUNER_FILE} and "
            "experiment_state-*.json): the sweep stopped before its first trial started, "
            "so there is nothing to resume; delete the folder and start the sweep again"
        )


def resume(
    experiment: str | Path,
    *,
    space: Any = None,
    address: str | None = None,
    dashboard_host: str | None = None,
    verbose: int | None = None,
) -> tune.ResultGrid:
    """Continue the sweep in an experiment folder (a local path or a URI).

    The trainable is rebuilt from experiment.json; the scheduler, the searcher and the
    callbacks come from Tune's saved state. Trials that raised after all their retries
    stay errors.

    Restoring unpickles Tune's saved state, which runs code stored in the folder: resume
    only folders that you or your sweeps wrote.

    Ray Tune (2.60) does not save the scheduler's state, so an ASHA scheduler's rungs are
    refilled from the results recorded before the interruption (see glo_search.rungs).
    Other schedulers start the resumed part with the state they had when the sweep began.

    Args:
        experiment: the experiment folder, as `glo-search sweep` printed it.
        space: the search space, needed only when the sweep searched a dict of Ray Tune
            domains that was not given by name or file (Tune does not save that dict).
        address: a Ray cluster address; default: start Ray in this process.
        dashboard_host: start Ray's dashboard bound to this address (local Ray only).
        verbose: Ray Tune's verbosity for the resumed part (0 hides its table of trial
            statuses); default: the sweep's, which Tune saved.
    """
    from glo_search.search import (
        configure_tune_environment,
        ensure_ray,
        make_trainable,
        rung_epochs,
        tune_output,
    )

    location = open_experiment(experiment)
    settings = read_settings(location)
    _check_tune_state(location)
    _check_result_tables(location)
    base = from_dict(settings["base_config"])
    param_space = _param_space(settings, space, base)
    classifier_state = classifier.load_state()
    _check_classifier(settings)
    # Before Ray starts, so that a second driver learns at once that it must wait.
    with driver_lock(location):
        ensure_ray(address, dashboard_host=dashboard_host)
        configure_tune_environment()

        trainable = make_trainable(
            base.to_dict(),
            classifier_state,
            settings["cpus_per_trial"],
            settings["gpus_per_trial"],
            settings["metric"],
            rung_epochs(settings),
        )
        _check_saved_state(location)
        settled = _settle_finished_trials(location)
        if settled:
            logger.info(
                "trials %s ended after Ray Tune last saved its state; they are kept as ended",
                ", ".join(settled),
            )
        try:
            tuner = tune.Tuner.restore(
                location.path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=False,
                param_space=param_space,
                storage_filesystem=None if location.is_local else location.filesystem,
            )
        except (pickle.UnpicklingError, EOFError) as error:
            raise ConfigError(
                f"cannot resume {location.uri}: Ray Tune's saved state ({TUNER_FILE}) is "
                f"damaged ({type(error).__name__}: {error}); restore it from a copy"
            ) from None
        if verbose is not None:
            tuner._local_tuner.get_run_config().verbose = verbose
        searcher = _relocate(tuner, location)
        rungs.refill(
            _restored_scheduler(tuner),
            location,
            _restored_trials(tuner),
            settings["metric"],
            settings["mode"],
        )
        logger.info("resuming the sweep in %s", location.uri)
        try:
            with tune_output(verbose):
                return tuner.fit()
        finally:
            if searcher is not None:
                searcher.sync_mirror()


def _param_space(settings: dict[str, Any], space: Any, base) -> dict | None:
    """Tune's param_space for sweeps over Ray Tune domains, which Tune does not save."""
    if settings.get("space_kind") != "ray":
        return None
    source = space if space is not None else settings.get("space_source")
    if source is None:
        raise ConfigError(
            f"the sweep searched a dict of Ray Tune domains ({settings.get('space')!r}) "
            "that was not given by name or file; pass the same dict as space= to resume()"
        )
    return resolve(source, base).space


# Fields of the classifier info that class_fidelity depends on. The weights path is left
# out because it changes with GLO_SEARCH_CACHE.
CLASSIFIER_IDENTITY = ("version", "held_out_accuracy", "train_indices", "held_out_indices")


def _check_classifier(settings: dict[str, Any]) -> None:
    recorded = settings.get("classifier")
    if recorded is None:
        return
    current = json.loads(json.dumps(asdict(classifier.load_info())))  # tuples as lists
    changes = [
        f"{key} {current[key]} now, {recorded.get(key)} then"
        for key in CLASSIFIER_IDENTITY
        if recorded.get(key) != current[key]
    ]
    if changes:
        logger.warning(
            "the reference classifier differs from the one the sweep started with (%s): "
            "class_fidelity of resumed trials is not comparable with earlier trials",
            "; ".join(changes),
        )


def _restored_scheduler(tuner: tune.Tuner):
    # NOTE: the same private TunerInternal attribute as in _relocate (Ray 2.60).
    return tuner._local_tuner._tune_config.scheduler


def _restored_trials(tuner: tune.Tuner) -> list | None:
    """Return the trial records of Tune's saved state, or None if Tune could not read them.

    Tuner.restore (Ray 2.60) loads them into an ExperimentAnalysis that it keeps in a
    private attribute (None when loading failed). Reading them again would fetch every
    trial's result.json a second time.
    """
    analysis = tuner._local_tuner._experiment_analysis
    return None if analysis is None else analysis.trials


def _relocate(tuner: tune.Tuner, location: ExperimentLocation) -> GloOptunaSearch | None:
    """Point the restored searcher and result writer at the folder as it is now.

    Tune unpickles both from the state saved when the sweep started, which holds the
    folder's path of that time. Without this, a moved folder would be written to at its
    old place.
    """
    from glo_search.search import study_place

    # NOTE: Tuner has no public accessor for the restored configs (Ray 2.60); this
    # reads TunerInternal's attributes and fails loudly if a Ray release renames them.
    internal = tuner._local_tuner
    search_alg = internal._tune_config.search_alg
    if isinstance(search_alg, RelocatableSearchGenerator):
        search_alg.relocate(location)
    searcher = base_searcher(search_alg)
    for callback in internal.get_run_config().callbacks or []:
        if isinstance(callback, ResultsWriter):
            callback.relocate(location)
    if not isinstance(searcher, GloOptunaSearch):
        return None
    searcher.relocate(*study_place(location))
    return searcher
