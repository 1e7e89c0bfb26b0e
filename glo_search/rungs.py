"""Refill the rungs of a restored ASHA scheduler from the experiment folder's epoch rows.

Ray Tune (2.60) pickles the scheduler when the sweep starts and never saves it again, so
a restored ASHAScheduler starts with empty rungs. An empty rung stops nothing, and a rung
with few entries stops few trials, so a resumed sweep would run almost without early
stopping. Filling each rung with the values that ASHA recorded before the interruption
lets the resumed part stop trials as the uninterrupted sweep would have.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from glo_search.results import read_epoch_rows
from glo_search.storage import ExperimentLocation

logger = logging.getLogger(__name__)


EMPTY_RUNGS = (
    "so its rungs start empty: trials are compared only with trials that reach a rung "
    "after the resume"
)


def refill(
    scheduler: TrialScheduler,
    location: ExperimentLocation,
    trials: list[Trial] | None,
    metric: str,
    mode: str,
) -> None:
    """Refill a restored ASHA scheduler's rungs from the experiment in location.

    ``trials`` are the trial records of Tune's saved state, as Tuner.restore loads them
    (None when they could not be read). Does nothing for other schedulers.
    """
    if not isinstance(scheduler, AsyncHyperBandScheduler):
        return
    if scheduler._time_attr != "epoch":
        logger.warning(
            "the restored ASHA scheduler counts time in %r, not in epochs, %s",
            scheduler._time_attr,
            EMPTY_RUNGS,
        )
        return
    if trials is None:
        logger.warning("Ray Tune's saved trials could not be read, %s", EMPTY_RUNGS)
        return
    epochs, _ = read_epoch_rows(location)
    filled = fill_asha_rungs(scheduler, epochs, resume_epochs(trials), metric, mode)
    counts = ", ".join(f"epoch {m:g}: {n}" for m, n in sorted(filled.items())) or "none"
    logger.info("refilled the ASHA rungs from the earlier results (trials per rung: %s)", counts)


def fill_asha_rungs(
    scheduler: AsyncHyperBandScheduler,
    epochs: dict[str, list[dict[str, Any]]],
    last_epochs: dict[str, int | None],
    metric: str,
    mode: str,
) -> dict[float, int]:
    """Record each trial's metric in every rung of the scheduler, as ASHA records it.

    ASHA records a trial at a rung with its first result at or past the rung's milestone
    and stores ``metric_op * value`` (metric_op is 1 for max and -1 for min) keyed by
    trial_id. Rows of diverged epochs carry placeholder values, not measurements, and are
    left out.

    Args:
        scheduler: the restored scheduler; its rungs are updated in place.
        epochs: each trial's epoch rows, sorted by epoch (see results.read_epoch_rows).
        last_epochs: for trials that Tune continues, the epoch of the checkpoint it
            continues from. Rows after it are left out, because the trial reports those
            epochs again and ASHA must judge them then. None (or a trial missing from
            the dict) means the trial has ended and all its rows count.
        metric, mode: the sweep's metric and direction, used when the scheduler was
            pickled before Tune set its own.

    Returns:
        The number of trials recorded per rung milestone (epochs).
    """
    metric = scheduler._metric or metric
    metric_op = scheduler._metric_op or (1.0 if mode == "max" else -1.0)
    # NOTE: each trial belongs to one bracket, chosen at random and not saved by Tune, so
    # with several brackets every trial is recorded in every bracket. make_scheduler
    # builds ASHA with one bracket.
    filled: dict[float, int] = {}
    for trial_id, rows in epochs.items():
        last = last_epochs.get(trial_id)
        usable = [
            row for row in rows if not row["diverged"] and (last is None or row["epoch"] <= last)
        ]
        # Ray 2.60 keeps the rungs in _Bracket._rungs: (milestone, {trial_id: value}).
        for bracket in scheduler._brackets:
            for milestone, recorded in bracket._rungs:
                row = next((row for row in usable if row["epoch"] >= milestone), None)
                if row is None:
                    continue
                recorded[trial_id] = metric_op * row[metric]
                filled[milestone] = filled.get(milestone, 0) + 1
    return filled


def resume_epochs(trials: list[Trial]) -> dict[str, int | None]:
    """Return, per trial of Tune's saved state, the epoch that a resume continues from.

    Finished trials (TERMINATED or ERROR, which a resume keeps as they are) map to None.
    Other trials map to the epoch of their latest checkpoint, or to 0 without one.
    """
    last: dict[str, int | None] = {}
    for trial in trials:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            last[trial.trial_id] = None
            continue
        checkpoint = trial.latest_checkpoint_result
        last[trial.trial_id] = int(checkpoint.metrics.get("epoch", 0)) if checkpoint else 0
    return last
