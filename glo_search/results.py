"""trials.parquet and epochs.parquet: the sweep's results as tables.

A Tune callback in the driver collects every reported epoch and rewrites both files
atomically whenever a trial ends (and at most every FLUSH_SECONDS while trials run). A
killed driver can lose the rows of the last few seconds. On resume the callback takes
them back from the result.json file that Ray Tune keeps in each trial folder.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray import tune
from ray.tune.experiment import Trial

from glo_search.config import FIELDS, ConfigError, from_dict
from glo_search.io import atomic_write
from glo_search.metrics import METRICS
from glo_search.spaces import config_keys
from glo_search.storage import ExperimentLocation, open_experiment

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
# Ray Tune's JsonLoggerCallback writes one JSON object per reported result into this file
# of each trial folder. Ray 2.60 copies it into the experiment folder whenever it saves a
# snapshot of its state, so after a kill it contains the results up to about then.
RESULT_FILE = "result.json"
FLUSH_SECONDS = 10.0
EPOCH_COLUMNS = ("epoch", "train_loss", "diverged", "time_total_s", "node_id")
STATUSES = ("running", "completed", "stopped", "diverged", "error")
FINAL_STATUSES = frozenset(STATUSES[1:])


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class ResultsWriter(tune.Callback):
    """Tune callback that keeps trials.parquet and epochs.parquet up to date."""

    def __init__(
        self,
        experiment_dir: str | Path | ExperimentLocation,
        base: dict[str, Any],
        metric: str,
        mode: str,
        max_epochs: int,
    ) -> None:
        self.relocate(experiment_dir)
        self.base = base
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[str, list[dict[str, Any]]] = {}
        self._last_flush = 0.0
        self._finished_before: set[str] = set()

    def relocate(self, experiment_dir: str | Path | ExperimentLocation) -> None:
        """Write to this folder (a resumed sweep's folder may have moved since it started)."""
        if not isinstance(experiment_dir, ExperimentLocation):
            experiment_dir = open_experiment(experiment_dir)
        self.location = experiment_dir
        self.experiment_dir = Path(experiment_dir.path)

    def setup(self, **info: Any) -> None:
        """Reload rows written before a resume, so finished trials stay in the files.

        Rows that epochs.parquet lacks because the driver was killed between two flushes
        are taken from the trials' result.json files.
        """
        location = self.location
        if location.has_file(TRIALS_FILE):
            for row in pq.read_table(location.open_input_file(TRIALS_FILE)).to_pylist():
                self.trials[row["trial_id"]] = row
            logger.info("loaded %d earlier trials from %s", len(self.trials), location.uri)
        finished = {
            trial_id for trial_id, row in self.trials.items() if row["status"] in FINAL_STATUSES
        }
        # A finished trial's rows were flushed when it ended. Its result.json can also
        # contain results of a rerun that this callback ignored (see the NOTE below).
        self.epochs, recovered = read_epoch_rows(location, skip=finished)
        if recovered:
            for trial_id, row in self.trials.items():
                if row["status"] == "running":
                    _summarize_rows(row, self.epochs.get(trial_id, []), self.metric, self.mode)
            logger.info(
                "recovered %d epoch rows missing from %s from the trials' %s files",
                recovered,
                EPOCHS_FILE,
                RESULT_FILE,
            )
            self.flush()
        # NOTE: Tune saves its state after trial checkpoints, not when a trial ends, so a
        # driver killed just after a trial ended can leave Tune resuming that trial.
        # glo_search.resume marks such trials ended in Tune's state first; should Tune run
        # one again anyway, its rows stay as they were recorded.
        self._finished_before = finished
        # Set here, not in __init__: a resume unpickles the writer that the sweep built,
        # and a folder written by an older version has no such attribute.
        self._started: set[str] = set()

    def _ignored(self, trial) -> bool:
        return trial.trial_id in self._finished_before

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if self._ignored(trial):
            logger.warning("trial %s had finished before the resume; Tune runs it again", trial)
            return
        self._started.add(trial.trial_id)
        self._update_trial(trial, "running")

    def on_trial_result(
        self, iteration: int, trials: list, trial, result: dict, **info: Any
    ) -> None:
        if self._ignored(trial):
            return
        rows = self.epochs.setdefault(trial.trial_id, [])
        add_epoch_row(rows, epoch_row(trial.trial_id, result))
        self._update_trial(trial, "running")
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def on_trial_save(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Name the checkpoint that Tune keeps once it has taken in the trial's new one.

        on_trial_result comes before that, so the row would name the checkpoint kept
        before it, which Tune deletes when it keeps one checkpoint per trial. A sweep
        interrupted before the trial ends keeps this row.
        """
        row = self.trials.get(trial.trial_id)
        if row is not None and not self._ignored(trial):
            row["checkpoint_path"] = _best_checkpoint(trial, self.experiment_dir)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._finish(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._finish(trial, error=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Settle the rows of trials that Tune restored as ended, then flush.

        A trial restored as TERMINATED or ERROR from Tune's saved state gets no
        on_trial_complete, so its row would otherwise stay "running" (or be missing) if the
        driver was killed before the row was written. Trials that started in this run
        are left alone, because on an interrupt (Ctrl-C) Tune (2.60) marks the trials
        still running as TERMINATED without calling on_trial_complete. Their rows must
        stay "running", so that the sweep shows as interrupted and resume continues them.
        Tune marks trials still waiting to start TERMINATED too. They have neither a row
        nor epoch rows, and get no row, so that resume runs and records them.
        """
        for trial in trials:
            if trial.status not in (Trial.TERMINATED, Trial.ERROR) or self._ignored(trial):
                continue
            if trial.trial_id in self._started:
                continue
            row = self.trials.get(trial.trial_id)
            if row is None and not self.epochs.get(trial.trial_id):
                continue
            if row is None or row["status"] == "running":
                self._finish(trial, error=trial.status == Trial.ERROR, flush=False)
        self.flush()

    def _finish(self, trial, error: bool, flush: bool = True) -> None:
        if self._ignored(trial):
            return
        rows = self.epochs.get(trial.trial_id, [])
        if error:
            status = "error"
        elif rows and rows[-1]["diverged"]:
            status = "diverged"
        elif rows and rows[-1]["epoch"] >= self.max_epochs:
            status = "completed"
        else:
            status = "stopped"
        row = self._update_trial(trial, status)
        logger.info(
            "trial %s %s after %s epochs: best %s=%s at epoch %s; %s",
            trial.trial_id,
            status,
            row["epochs_run"],
            self.metric,
            row[f"best_{self.metric}"],
            row["best_epoch"],
            {k: row[k] for k in config_keys(trial.config)},
        )
        if flush:
            self.flush()

    def _trial_row(self, trial) -> dict[str, Any]:
        if trial.trial_id not in self.trials:
            config = {**self.base, **config_keys(trial.config)}
            try:
                config = from_dict(config).to_dict()  # numpy scalars to plain types
            except ConfigError:
                pass  # the trial itself fails and reports the error
            self.trials[trial.trial_id] = {
                "trial_id": trial.trial_id,
                "status": "running",
                **{name: config[name] for name in FIELDS},
                "trial_dir": _relative(trial.path, self.experiment_dir),
            }
        return self.trials[trial.trial_id]

    def _update_trial(self, trial, status: str) -> dict[str, Any]:
        row = self._trial_row(trial)
        rows = self.epochs.get(trial.trial_id, [])
        row["status"] = status
        row["checkpoint_path"] = _best_checkpoint(trial, self.experiment_dir)
        _summarize_rows(row, rows, self.metric, self.mode)
        return row

    def flush(self) -> None:
        """Rewrite both Parquet files atomically."""
        self._last_flush = time.monotonic()
        trials = list(self.trials.values())
        epochs = [row for rows in self.epochs.values() for row in rows]
        self.location.write_bytes(TRIALS_FILE, table_bytes(trials))
        self.location.write_bytes(EPOCHS_FILE, table_bytes(epochs))


def _summarize_rows(row: dict[str, Any], rows: list[dict[str, Any]], metric: str, mode: str):
    """Update a trials.parquet row from the trial's epoch rows."""
    row["epochs_run"] = rows[-1]["epoch"] if rows else 0
    row["wall_time_s"] = rows[-1]["time_total_s"] if rows else 0.0
    row.update(summarize(rows, metric, mode))


def epoch_row(trial_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Return the epochs.parquet row of one result that the trainable reported."""
    row = {"trial_id": trial_id, **{k: result.get(k) for k in EPOCH_COLUMNS}}
    row["epoch"] = int(result["epoch"])
    row.update({name: float(result[name]) for name in METRICS})
    row.update({f"nearest_{k}": int(result.get(f"nearest_{k}", -1)) for k in range(10)})
    return row


def add_epoch_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Append row to a trial's rows in place, dropping the rows of its epoch and later.

    A trial retried from its checkpoint reports some epochs again, and the newest report
    wins.
    """
    rows[:] = [earlier for earlier in rows if earlier["epoch"] < row["epoch"]]
    rows.append(row)


def read_epoch_rows(
    location: ExperimentLocation, skip: set[str] = frozenset()
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Read every trial's epoch rows: epochs.parquet plus the rows only result.json has.

    Returns a dict from trial_id to rows sorted by epoch, and the number of rows taken
    from result.json. Where both files have an epoch, the epochs.parquet row is kept.
    The result.json rows of trials in ``skip`` are not read.
    """
    epochs: dict[str, list[dict[str, Any]]] = {}
    if location.has_file(EPOCHS_FILE):
        for row in pq.read_table(location.open_input_file(EPOCHS_FILE)).to_pylist():
            epochs.setdefault(row["trial_id"], []).append(row)
    recovered = 0
    for trial_id, results in _read_result_files(location).items():
        if trial_id in skip:
            continue
        replayed: list[dict[str, Any]] = []
        for result in results:
            add_epoch_row(replayed, epoch_row(trial_id, result))
        rows = epochs.setdefault(trial_id, [])
        known = {row["epoch"] for row in rows}
        missing = [row for row in replayed if row["epoch"] not in known]
        rows.extend(missing)
        recovered += len(missing)
    for rows in epochs.values():
        rows.sort(key=lambda row: row["epoch"])
    return epochs, recovered


def _read_result_files(location: ExperimentLocation) -> dict[str, list[dict[str, Any]]]:
    """Return the epoch results in the result.json of every trial folder, by trial_id."""
    results: dict[str, list[dict[str, Any]]] = {}
    selector = pafs.FileSelector(location.path, allow_not_found=True)
    for info in location.filesystem.get_file_info(selector):
        relative = f"{info.base_name}/{RESULT_FILE}"
        if info.type != pafs.FileType.Directory or not location.has_file(relative):
            continue
        for number, line in enumerate(location.read_bytes(relative).splitlines(), 1):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                # A driver killed while Ray wrote the file can leave its last line cut.
                logger.warning("skipped unreadable line %d of %s", number, relative)
                continue
            if "trial_id" in result and "epoch" in result and all(m in result for m in METRICS):
                results.setdefault(result["trial_id"], []).append(result)
    return results


def summarize(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """Summarize a trial's epochs for trials.parquet.

    ``best_epoch`` is the epoch of the best sweep metric, whose checkpoint the sweep keeps.
    For every metric, ``best_<name>`` is its own best over the epochs (possibly from
    another epoch), ``at_best_<name>`` its value at ``best_epoch`` and ``last_<name>`` its
    value at the last epoch.
    """
    summary: dict[str, Any] = {"best_epoch": None}
    best = None
    best_row = None
    for row in rows:
        if _is_better(row[metric], best, mode):
            best = row[metric]
            best_row = row
            summary["best_epoch"] = row["epoch"]
    for name, spec in METRICS.items():
        values = [row[name] for row in rows]
        if not values:
            summary[f"best_{name}"] = summary[f"at_best_{name}"] = None
            summary[f"last_{name}"] = None
            continue
        summary[f"best_{name}"] = max(values) if spec.mode == "max" else min(values)
        summary[f"at_best_{name}"] = best_row[name] if best_row is not None else None
        summary[f"last_{name}"] = values[-1]
    return summary


def _relative(path: str | None, root: Path) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _best_checkpoint(trial, root: Path) -> str | None:
    """Relative path of the best checkpoint Tune kept for a trial (the latest if unscored)."""
    manager = getattr(trial.run_metadata, "checkpoint_manager", None)
    results = getattr(manager, "best_checkpoint_results", None) or []
    if results:
        return _relative(results[-1].checkpoint.path, root)
    return _relative(trial.checkpoint.path, root) if trial.checkpoint else None


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def table_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def read_experiment(experiment_dir: str | Path | ExperimentLocation):
    """Return (trials, epochs) pandas DataFrames of an experiment folder (path or URI)."""
    location = experiment_dir
    if not isinstance(location, ExperimentLocation):
        location = open_experiment(experiment_dir)
    return (
        pq.read_table(location.open_input_file(TRIALS_FILE)).to_pandas(),
        pq.read_table(location.open_input_file(EPOCHS_FILE)).to_pandas(),
    )


def best_trials_table(trials, metric: str, top: int = 5) -> str:
    """Format the best trials by their best value of metric as a text table."""
    if trials.empty:
        return "no trials finished"
    ascending = METRICS[metric].mode == "min"
    columns = [
        "trial_id",
        "status",
        "class_dim",
        "content_dim",
        "noise_std",
        "content_decay",
        f"best_{metric}",
        "best_epoch",
        "epochs_run",
    ]
    # The other metrics as they were at the best epoch, the checkpoint the sweep keeps.
    extra = [
        f"at_best_{name}"
        for name in ("recon_error", "content_leakage")
        if f"best_{name}" not in columns
    ]
    best = trials.sort_values(f"best_{metric}", ascending=ascending, na_position="last")
    table = best[columns + extra].head(top).to_string(index=False, float_format="{:.4g}".format)
    return f"best {min(top, len(trials))} of {len(trials)} trials by {metric}:\n{table}"


def best_trial_summary(trials, epochs, metric: str) -> str:
    """Summarize the best trial in one line: its best metric and how far recon_error fell.

    For a sweep that minimizes recon_error itself, the line follows disentanglement.
    """
    column = f"best_{metric}"
    finished = trials.dropna(subset=[column])
    if finished.empty:
        return "no trial reported a result"
    ascending = METRICS[metric].mode == "min"
    best = finished.sort_values(column, ascending=ascending).iloc[0]
    rows = epochs[epochs["trial_id"] == best["trial_id"]].sort_values("epoch")
    best_row = rows[rows["epoch"] == best["best_epoch"]].iloc[0]
    first = rows.iloc[0]
    other = "disentanglement" if metric == "recon_error" else "recon_error"
    return (
        f"best trial {best['trial_id']}: {metric}={best[column]:.4f} at epoch "
        f"{int(best['best_epoch'])}; {other} {best_row[other]:.4f} there, "
        f"{first[other]:.4f} at epoch {int(first['epoch'])}, the first evaluated"
    )
