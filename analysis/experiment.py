"""Read experiment folders written by ``glo-search sweep``, without Ray.

Every path is taken relative to the folder given, never from paths stored inside it, so a
folder that was copied or moved analyzes the same. The files read are trials.parquet,
epochs.parquet, experiment.json and the Optuna study in optuna.db.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from glo_search.metrics import METRICS

logger = logging.getLogger(__name__)

# The names glo_search.results and glo_search.search write; those modules import Ray,
# which the analysis does not need.
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
EXPERIMENT_FILE = "experiment.json"
STUDY_FILE = "optuna.db"


class AnalysisError(ValueError):
    """An experiment folder or an analysis option that cannot be used; the message is one line."""


@dataclass
class Experiment:
    """One experiment folder: its settings from experiment.json and its two result tables."""

    folder: Path
    name: str
    info: dict[str, Any]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    _study: Any = field(default=None, repr=False)
    _study_read: bool = field(default=False, repr=False)

    @property
    def metric(self) -> str:
        return self.info.get("metric", "disentanglement")

    @property
    def mode(self) -> str:
        return self.info.get("mode", METRICS[self.metric].mode)

    def study(self):
        """Return the Optuna study of optuna.db, or None when the folder has none."""
        if not self._study_read:
            self._study = load_study(self.folder, self.info.get("name"))
            self._study_read = True
        return self._study


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_info(folder: str | Path) -> dict[str, Any]:
    """Return experiment.json of a folder as a dict, or {} when the file is missing."""
    path = Path(folder) / EXPERIMENT_FILE
    if not path.is_file():
        logger.warning("%s not found: using defaults for metric, mode and rungs", path)
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisError(f"invalid JSON in {path}: {error}") from None


def read_tables(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the (trials, epochs) DataFrames of one experiment folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AnalysisError(
            f"{folder} is a file; pass the experiment folder that `glo-search sweep` printed"
        )
    if not folder.is_dir():
        raise AnalysisError(f"experiment folder not found: {folder}")
    for name in (TRIALS_FILE, EPOCHS_FILE):
        if not (folder / name).is_file():
            raise AnalysisError(
                f"{folder} has no {name}; pass a folder that `glo-search sweep` created "
                f"(it contains {TRIALS_FILE}, {EPOCHS_FILE} and {EXPERIMENT_FILE})"
            )
    trials = pd.read_parquet(folder / TRIALS_FILE)
    epochs = pd.read_parquet(folder / EPOCHS_FILE)
    return trials, epochs


def load_experiment(folder: str | Path, name: str | None = None) -> Experiment:
    """Read one experiment folder; ``name`` overrides the name stored in experiment.json."""
    folder = Path(folder).expanduser().resolve()
    trials, epochs = read_tables(folder)
    info = read_info(folder)
    metric = info.get("metric", "disentanglement")
    if metric not in METRICS:
        raise AnalysisError(
            f"{folder / EXPERIMENT_FILE} names unknown metric {metric!r}; "
            f"valid metrics: {', '.join(METRICS)}"
        )
    return Experiment(folder, name or info.get("name") or folder.name, info, trials, epochs)


def load_experiments(paths: str | Path | Iterable[str | Path]) -> list[Experiment]:
    """Read one or several distinct experiment folders.

    Folders that share a name (copies of one sweep, or sweeps named alike in different
    places) get a suffix: ``#2``, ``#3``.
    """
    experiments: list[Experiment] = []
    seen: dict[str, int] = {}
    folders: set[Path] = set()
    for path in _as_paths(paths):
        experiment = load_experiment(path)
        if experiment.folder in folders:
            # Its trials would count twice in every table, correlation and plot.
            raise AnalysisError(f"experiment folder {experiment.folder} is given twice")
        folders.add(experiment.folder)
        count = seen.get(experiment.name, 0) + 1
        seen[experiment.name] = count
        if count > 1:
            experiment.name = f"{experiment.name}#{count}"
        experiments.append(experiment)
    if not experiments:
        raise AnalysisError("no experiment folder given; pass at least one")
    return experiments


def combine(experiments: list[Experiment]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate the tables of several experiments, adding an ``experiment`` column."""
    trials = [e.trials.assign(experiment=e.name) for e in experiments]
    epochs = [e.epochs.assign(experiment=e.name) for e in experiments]
    return (
        pd.concat(trials, ignore_index=True),
        pd.concat(epochs, ignore_index=True),
    )


def load(paths: str | Path | Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the (trials, epochs) DataFrames of one experiment folder or several.

    trials has one row per trial (trial_id, status, every TrainConfig field, best_<metric>
    and last_<metric> of every metric, best_epoch, epochs run, wall_time_s, checkpoint_path,
    trial_dir); epochs has one row per trial and epoch. Both gain an ``experiment`` column
    with the experiment's name, which distinguishes the rows of several folders.
    """
    return combine(load_experiments(paths))


def load_study(folder: str | Path, study_name: str | None = None):
    """Return an in-memory copy of the Optuna study in ``folder/optuna.db``, or None.

    The study is found by ``study_name`` (the experiment name the sweep gave it), or, when
    that name is absent, as the only study in the file. The copy makes repeated reads of
    the trials fast and keeps the analysis from writing to the experiment's database.
    """
    import optuna

    from glo_search.storage import sqlite_url

    path = Path(folder).resolve() / STUDY_FILE
    if not path.is_file():
        return None
    # RDBStorage creates an empty database for a missing file, hence the check above.
    storage = optuna.storages.RDBStorage(sqlite_url(path))
    names = optuna.get_all_study_names(storage)
    if study_name not in names:
        if len(names) != 1:
            logger.warning(
                "%s contains studies %s but none named %r: skipping parameter importance",
                path,
                names,
                study_name,
            )
            return None
        study_name = names[0]
    stored = optuna.load_study(study_name=study_name, storage=storage)
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line
    try:
        study = optuna.create_study(study_name=study_name, directions=stored.directions)
    finally:
        optuna.logging.set_verbosity(previous)
    study.add_trials(stored.get_trials(deepcopy=False))
    return study
